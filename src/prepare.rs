//! `kiln prepare`: tokenizes a dataset's sources once into token shards under
//! `data.cache_dir`, for every later run to memory-map (see `dataset.rs` for the layout).
//!
//! A prepared directory is named by a key over what its tokens depend on: each source file's
//! canonical path, size and modification time, the text field, the tokenizer (its kind and
//! size for one kiln trains, else the SHA-256 of its `tokenizer.json`) and the shard size. A
//! run whose key matches a complete directory tokenizes nothing; a changed file changes the
//! key, so stale tokens are never used.
//!
//! Everything is written into a hidden staging directory that is renamed into place after the
//! manifest (written last) and every file are on disk, so a killed prepare leaves nothing that
//! could pass for complete; the next one removes the debris and starts over. A lock file
//! keeps two processes from preparing the same key at once.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::checkpoint::storage::{LocalFs, Storage, write_atomic};
use crate::config::{DataConfig, SourceConfig, Split, TokenizerKind, TokenizerSetting};
use crate::dataset::{FORMAT_VERSION, MANIFEST_FILE, Manifest, ShardEntry, SourceEntry, TOKENIZER_FILE, TokenDtype};
use crate::safetensors_io::hex;
use crate::sources::{self, DocumentReader, FileStamp, Skipped, Text};
use crate::tokenizer::KilnTokenizer;

/// Changes whenever a fix changes the ids kiln writes for the same text and tokenizer, so
/// that datasets prepared before it are prepared again rather than reused (2: chunks and text
/// pieces are cut only after a newline standing alone between non-space characters).
const ENCODING_VERSION: u32 = 2;

/// Documents are tokenized in parallel in batches of about this many bytes.
const BATCH_BYTES: usize = 8 << 20;

/// The tokenizer the dataset is prepared with.
#[derive(Clone)]
pub enum TokenizerChoice {
    /// One kiln trains on the sources (`data.tokenizer`, `data.vocab_size`).
    Train { kind: TokenizerKind, vocab_size: usize },
    /// One given as it is: a checkpoint's or a pretrained model's.
    Given(KilnTokenizer),
}

impl TokenizerChoice {
    /// What `data.tokenizer` asks for. A `tokenizer.json` is read with the special tokens its
    /// directory declares (`tokenizer_config.json`, `config.json`, `generation_config.json`),
    /// as a model directory's would be.
    pub fn from_config(data: &DataConfig) -> Result<Self> {
        Ok(match &data.tokenizer {
            TokenizerSetting::Train(kind) => Self::Train { kind: *kind, vocab_size: data.vocab_size },
            TokenizerSetting::File(path) => Self::Given(read_tokenizer_file(path).with_context(|| format!("data.tokenizer = {}", path.display()))?),
        })
    }
}

/// A `tokenizer.json` beside the files of a model directory is read as that directory's;
/// one on its own keeps the special tokens it has (kiln's `<|endoftext|>` ends a text).
fn read_tokenizer_file(path: &Path) -> Result<KilnTokenizer> {
    let dir = crate::checkpoint::storage::parent(path);
    let in_model_dir = ["tokenizer_config.json", "config.json", "generation_config.json"].iter().any(|f| dir.join(f).exists());
    if path.file_name().is_some_and(|n| n == TOKENIZER_FILE) && in_model_dir {
        if let Some(tokenizer) = KilnTokenizer::from_dir(dir)? {
            return Ok(tokenizer);
        }
    }
    KilnTokenizer::from_file(path)
}

/// A prepared dataset on disk.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    /// `false` when an existing directory matched and nothing was tokenized.
    pub tokenized: bool,
}

/// What a preparation reads: the sources' files, and the key naming the result.
struct Plan {
    sources: Vec<(SourceConfig, Vec<FileStamp>)>,
    key: String,
    dir: PathBuf,
}

fn plan(data: &DataConfig, choice: &TokenizerChoice) -> Result<Plan> {
    let mut sources = Vec::new();
    for (i, source) in data.effective_sources().into_iter().enumerate() {
        let what = if data.sources.is_empty() { "data.path".to_string() } else { format!("data.sources[{i}].path") };
        let files = sources::resolve(&source.path).with_context(|| what.clone())?;
        let stamps = files
            .iter()
            .map(|f| {
                let canonical = std::fs::canonicalize(f).with_context(|| format!("{what}: cannot resolve {}", f.display()))?;
                FileStamp::of(&canonical)
            })
            .collect::<Result<Vec<_>>>()?;
        sources.push((source, stamps));
    }
    let tokenizer = match choice {
        TokenizerChoice::Train { kind, vocab_size } => {
            json!({"train": kind, "vocab_size": vocab_size, "sample_mib": data.tokenizer_sample_mib})
        }
        TokenizerChoice::Given(t) => json!({"sha256": tokenizer_sha256(t)?}),
    };
    let key_json = json!({
        "format_version": FORMAT_VERSION,
        "encoding": ENCODING_VERSION,
        "sources": sources.iter().map(source_key).collect::<Vec<_>>(),
        "tokenizer": tokenizer,
        "skip_bad_records": data.skip_bad_records,
        "shard_tokens": data.shard_tokens,
    });
    let key = hex(&Sha256::digest(key_json.to_string().as_bytes()));
    let dir = data.cache_dir.join(&key[..16]);
    Ok(Plan { sources, key, dir })
}

/// What a source's tokens depend on; a training source's entry is the same as before sources
/// had splits, so those datasets keep their keys.
fn source_key((source, files): &(SourceConfig, Vec<FileStamp>)) -> serde_json::Value {
    match source.split {
        Split::Train => json!({"files": files, "text_field": source.text_field}),
        Split::Validation => json!({"files": files, "text_field": source.text_field, "split": source.split}),
    }
}

/// SHA-256 of the tokenizer's `tokenizer.json` as a prepared dataset stores it.
pub fn tokenizer_sha256(t: &KilnTokenizer) -> Result<String> {
    Ok(hex(&Sha256::digest(t.to_json()?.as_bytes())))
}

/// The prepared directory for `data` with `choice`, if a complete one exists already.
pub fn find(data: &DataConfig, choice: &TokenizerChoice) -> Result<Option<PathBuf>> {
    let plan = plan(data, choice)?;
    Ok(complete(&plan).then_some(plan.dir))
}

fn complete(plan: &Plan) -> bool {
    Manifest::read(&plan.dir).is_ok_and(|m| m.key == plan.key)
}

/// Prepares `data` with `choice` unless a complete directory for it exists; returns it.
pub fn prepare(data: &DataConfig, choice: &TokenizerChoice) -> Result<Prepared> {
    let plan = plan(data, choice)?;
    if complete(&plan) {
        return Ok(Prepared { dir: plan.dir, tokenized: false });
    }
    let cache = &data.cache_dir;
    tracing::info!("preparing the dataset into {} (tokenized once, reused by later runs)", cache.display());
    std::fs::create_dir_all(cache).with_context(|| format!("data.cache_dir: cannot create {}", cache.display()))?;
    let name = &plan.key[..16];
    let lock_path = cache.join(format!(".{name}.lock"));
    let lock = File::create(&lock_path).with_context(|| format!("cannot create {}", lock_path.display()))?;
    lock.lock().with_context(|| format!("cannot lock {}", lock_path.display()))?;
    // Another process may have finished it while this one waited for the lock.
    if complete(&plan) {
        return Ok(Prepared { dir: plan.dir, tokenized: false });
    }
    // Holding the lock, any staging directory of this key is a dead prepare's debris, and a
    // directory without a matching manifest is one whose rename never completed its contents.
    for entry in std::fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))? {
        let path = entry?.path();
        let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if file_name.starts_with(&format!(".{name}.staging-")) {
            std::fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    if plan.dir.exists() {
        std::fs::remove_dir_all(&plan.dir).with_context(|| format!("cannot remove the incomplete {}", plan.dir.display()))?;
    }
    let staging = cache.join(format!(".{name}.staging-{}", std::process::id()));
    std::fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let result = build(data, choice, &plan, &staging);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::rename(&staging, &plan.dir).with_context(|| format!("cannot rename {} to {}", staging.display(), plan.dir.display()))?;
    LocalFs.sync_dir(cache).with_context(|| format!("cannot sync {}", cache.display()))?;
    drop(lock);
    Ok(Prepared { dir: plan.dir, tokenized: true })
}

fn build(data: &DataConfig, choice: &TokenizerChoice, plan: &Plan, staging: &Path) -> Result<()> {
    let tokenizer = match choice {
        TokenizerChoice::Given(t) => t.clone(),
        TokenizerChoice::Train { kind, vocab_size } => train_tokenizer(data, plan, *kind, *vocab_size)?,
    };
    let tokenizer_json = tokenizer.to_json()?;
    write_atomic(&LocalFs, &staging.join(TOKENIZER_FILE), tokenizer_json.as_bytes())
        .with_context(|| format!("cannot write {}", staging.join(TOKENIZER_FILE).display()))?;
    let vocab_size = tokenizer.vocab_size();
    let dtype = TokenDtype::for_vocab(vocab_size);
    let eos = tokenizer.special_tokens().eos_token_ids.first().copied();

    let total_bytes: u64 = plan.sources.iter().flat_map(|(_, files)| files.iter().map(|f| f.size)).sum();
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30.cyan/blue}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg} | ETA {eta}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut sources = Vec::new();
    let mut shards = Vec::new();
    for (index, (source, files)) in plan.sources.iter().enumerate() {
        let mut writer = ShardWriter::new(staging, index, dtype, data.shard_tokens);
        let mut reader = DocumentReader::new(&source.text_field, data.skip_bad_records);
        if tokenizer.encodes_pieces_exactly() {
            reader = reader.in_pieces(sources::TEXT_PIECE_BYTES);
        }
        let mut num_documents = 0u64;
        for file in files {
            let mut batch: Vec<Text> = Vec::new();
            let mut batch_bytes = 0usize;
            let mut flush = |batch: &mut Vec<Text>, writer: &mut ShardWriter| -> Result<()> {
                let encoded: Vec<Result<Vec<u32>>> = batch.par_iter().map(|doc| tokenizer.encode_corpus(&doc.text)).collect();
                for (doc, ids) in batch.iter().zip(encoded) {
                    let mut ids = ids.with_context(|| format!("cannot tokenize a document of {}", file.path.display()))?;
                    if doc.ends_document {
                        ids.extend(eos);
                        num_documents += 1;
                    }
                    writer.push(&ids)?;
                    bar.inc(doc.text.len() as u64);
                }
                batch.clear();
                let seconds = started.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!("{:.0}k tokens/s", (shards_tokens(&shards) + writer.total) as f64 / seconds / 1e3));
                Ok(())
            };
            reader.read(&file.path, |doc| {
                batch_bytes += doc.text.len();
                batch.push(doc);
                if batch_bytes >= BATCH_BYTES {
                    batch_bytes = 0;
                    flush(&mut batch, &mut writer)?;
                }
                Ok(())
            })?;
            flush(&mut batch, &mut writer)?;
        }
        let source_shards = writer.finish()?;
        let skipped = reader.skipped;
        let num_tokens: u64 = source_shards.iter().map(|s| s.num_tokens).sum();
        if num_tokens == 0 {
            bail!("{}: no documents to train on (every record was skipped or empty)", source.path.display());
        }
        if skipped.records > 0 {
            tracing::warn!("{}: skipped {} bad records (data.skip_bad_records)", source.path.display(), skipped.records);
        }
        sources.push(SourceEntry {
            path: source.path.clone(),
            text_field: source.text_field.clone(),
            weight: source.weight,
            split: source.split,
            files: files.clone(),
            num_documents,
            num_tokens,
            skipped,
        });
        shards.extend(source_shards);
    }
    bar.finish_and_clear();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        key: plan.key.clone(),
        num_tokens: sources.iter().map(|s| s.num_tokens).sum(),
        num_documents: sources.iter().map(|s| s.num_documents).sum(),
        eos_token_id: eos,
        dtype,
        vocab_size,
        tokenizer_sha256: tokenizer_sha256(&tokenizer)?,
        skipped: Skipped { records: sources.iter().map(|s| s.skipped.records).sum() },
        sources,
        shards,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
    write_atomic(&LocalFs, &staging.join(MANIFEST_FILE), text.as_bytes()).with_context(|| format!("cannot write {}", staging.join(MANIFEST_FILE).display()))?;
    tracing::info!(
        "prepared {} tokens of {} documents in {:.1} s",
        manifest.num_tokens,
        manifest.num_documents,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn shards_tokens(shards: &[ShardEntry]) -> u64 {
    shards.iter().map(|s| s.num_tokens).sum()
}

/// A tokenizer kiln trains: a character vocabulary over every character of the sources (one
/// streaming pass, so no text the model will see is missing from it), or a byte-level BPE on
/// a bounded sample: the first `data.tokenizer_sample_mib` MiB of documents, in equal shares
/// per training source (validation sources stay unseen, as held-out text should).
fn train_tokenizer(data: &DataConfig, plan: &Plan, kind: TokenizerKind, vocab_size: usize) -> Result<KilnTokenizer> {
    match kind {
        TokenizerKind::Char => {
            let mut chars = BTreeSet::new();
            for (source, files) in &plan.sources {
                let mut reader = DocumentReader::new(&source.text_field, data.skip_bad_records).in_pieces(sources::TEXT_PIECE_BYTES);
                for file in files {
                    reader.read(&file.path, |doc| {
                        chars.extend(doc.text.chars());
                        Ok(())
                    })?;
                }
            }
            let alphabet: String = chars.into_iter().collect();
            KilnTokenizer::train(kind, &alphabet, vocab_size)
        }
        TokenizerKind::Bpe => {
            let training: Vec<_> = plan.sources.iter().filter(|(s, _)| s.split.is_train()).collect();
            let share = (data.tokenizer_sample_mib << 20) / training.len().max(1);
            let mut sample = String::new();
            for (source, files) in training {
                let mut reader = DocumentReader::new(&source.text_field, data.skip_bad_records).in_pieces(sources::TEXT_PIECE_BYTES);
                let mut taken = 0usize;
                // Documents are joined by a newline; the pieces of one document are not.
                let mut at_document_start = true;
                for file in files {
                    if taken >= share {
                        break;
                    }
                    // Reading stops at the budget by an error that is not one.
                    let full = reader.read(&file.path, |doc| {
                        let room = share - taken;
                        let mut piece = doc.text.as_str();
                        if piece.len() > room {
                            let mut cut = room;
                            while !piece.is_char_boundary(cut) {
                                cut -= 1;
                            }
                            piece = &piece[..cut];
                        }
                        if !sample.is_empty() && at_document_start {
                            sample.push('\n');
                        }
                        sample.push_str(piece);
                        at_document_start = doc.ends_document;
                        taken += piece.len();
                        if taken >= share { Err(SampleFull.into()) } else { Ok(()) }
                    });
                    match full {
                        Err(e) if e.is::<SampleFull>() => break,
                        other => other?,
                    }
                }
            }
            KilnTokenizer::train(kind, &sample, vocab_size)
        }
    }
}

#[derive(Debug)]
struct SampleFull;

impl std::fmt::Display for SampleFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the tokenizer sample is full")
    }
}

impl std::error::Error for SampleFull {}

/// Writes one source's token stream as shards of at most `max_tokens` tokens, hashing each as
/// it is written.
struct ShardWriter {
    dir: PathBuf,
    source: usize,
    dtype: TokenDtype,
    max_tokens: u64,
    current: Option<OpenShard>,
    done: Vec<ShardEntry>,
    /// Tokens written so far.
    total: u64,
    bytes: Vec<u8>,
}

struct OpenShard {
    name: String,
    file: BufWriter<File>,
    sha: Sha256,
    tokens: u64,
}

impl ShardWriter {
    fn new(dir: &Path, source: usize, dtype: TokenDtype, max_tokens: u64) -> Self {
        Self { dir: dir.to_owned(), source, dtype, max_tokens: max_tokens.max(1), current: None, done: Vec::new(), total: 0, bytes: Vec::new() }
    }

    fn push(&mut self, mut ids: &[u32]) -> Result<()> {
        while !ids.is_empty() {
            if self.current.is_none() {
                let name = format!("s{:03}-{:05}.bin", self.source, self.done.len());
                let path = self.dir.join(&name);
                let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                self.current = Some(OpenShard { name, file: BufWriter::with_capacity(1 << 20, file), sha: Sha256::new(), tokens: 0 });
            }
            let shard = self.current.as_mut().expect("opened above");
            let n = ((self.max_tokens - shard.tokens) as usize).min(ids.len());
            self.bytes.clear();
            match self.dtype {
                TokenDtype::U16 => ids[..n].iter().for_each(|&id| self.bytes.extend((id as u16).to_le_bytes())),
                TokenDtype::U32 => ids[..n].iter().for_each(|&id| self.bytes.extend(id.to_le_bytes())),
            }
            shard.sha.update(&self.bytes);
            shard.file.write_all(&self.bytes).with_context(|| format!("cannot write {}", self.dir.join(&shard.name).display()))?;
            shard.tokens += n as u64;
            self.total += n as u64;
            ids = &ids[n..];
            if shard.tokens == self.max_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(shard) = self.current.take() {
            let path = self.dir.join(&shard.name);
            let file = shard.file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("cannot write {}", path.display()))?;
            file.sync_all().with_context(|| format!("cannot sync {}", path.display()))?;
            self.done.push(ShardEntry { path: shard.name, source: self.source, num_tokens: shard.tokens, sha256: hex(&shard.sha.finalize()) });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<ShardEntry>> {
        self.close()?;
        Ok(self.done)
    }
}
