//! The documents of a dataset's sources: which files a `[[data.sources]]` entry names (a file,
//! a directory or a glob), and the documents each file holds.
//!
//! - `.txt`: the whole file is one document (UTF-8).
//! - `.jsonl`: one JSON object per line, the document its `text_field` (a string); blank
//!   lines are skipped.
//! - `.gz` after either: the same, gzip-compressed.
//! - `.parquet`: one document per row, the string column `text_field` (any codec pyarrow
//!   writes by default or commonly: snappy, gzip, lz4, zstd). A file without that column is
//!   refused whatever `skip_bad_records` says: that is a configuration error, not a record.
//!
//! A record that cannot be read (a line that is not JSON, a missing or non-string field,
//! invalid UTF-8) stops reading with an error naming the file and line, unless
//! `skip_bad_records` is set: then it is skipped, counted and the first few are logged.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How a file's documents are stored, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
}

/// One file of a source as it was when prepared: a changed size or modification time makes
/// the prepared data stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub modified_ns: u128,
}

impl FileStamp {
    pub fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        let modified = meta.modified().with_context(|| format!("{}: no modification time", path.display()))?;
        let modified_ns = modified.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(Self { path: path.to_owned(), size: meta.len(), modified_ns })
    }
}

/// The file's format from its extension (`.gz` looked through), or an error naming it.
pub fn format_of(path: &Path) -> Result<Format> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    if name.ends_with(".parquet") {
        return Ok(Format::Parquet);
    }
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".txt") {
        Ok(Format::Text)
    } else if name.ends_with(".jsonl") {
        Ok(Format::Jsonl)
    } else {
        bail!("{}: not a dataset file kiln reads (.txt or .jsonl, optionally .gz, or .parquet)", path.display())
    }
}

/// The files `pattern` names, sorted: the file itself, the dataset files directly inside a
/// directory, or the files a glob matches. Nothing matched is an error naming the pattern.
pub fn resolve(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_str().ok_or_else(|| anyhow!("{}: the path is not UTF-8", pattern.display()))?;
    let mut files: Vec<PathBuf> = if pattern.is_dir() {
        let entries = std::fs::read_dir(pattern).with_context(|| format!("cannot list {}", pattern.display()))?;
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.with_context(|| format!("cannot list {}", pattern.display()))?.path();
            if path.is_file() && format_of(&path).is_ok() {
                files.push(path);
            }
        }
        files
    } else if pattern.is_file() {
        vec![pattern.to_owned()]
    } else if text.contains(['*', '?', '[']) {
        let paths = glob::glob(text).map_err(|e| anyhow!("{text}: not a valid glob: {e}"))?;
        let mut files = Vec::new();
        for path in paths {
            let path = path.map_err(|e| anyhow!("{text}: {e}"))?;
            if path.is_file() {
                files.push(path);
            }
        }
        files
    } else {
        bail!("{}: no such file or directory", pattern.display());
    };
    if files.is_empty() {
        bail!("{}: matches no dataset file (.txt or .jsonl, optionally .gz, or .parquet)", pattern.display());
    }
    files.sort();
    for file in &files {
        format_of(file)?;
    }
    Ok(files)
}

/// Counts of what reading skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub records: u64,
}

/// Reads documents from files, one field of them, refusing or counting bad records.
pub struct DocumentReader<'a> {
    text_field: &'a str,
    skip_bad_records: bool,
    /// What was skipped so far.
    pub skipped: Skipped,
}

impl<'a> DocumentReader<'a> {
    pub fn new(text_field: &'a str, skip_bad_records: bool) -> Self {
        Self { text_field, skip_bad_records, skipped: Skipped::default() }
    }

    /// Reads the documents of `path` in order, handing each to `each` (which may stop the
    /// reading by returning an error).
    pub fn read(&mut self, path: &Path, each: impl FnMut(String) -> Result<()>) -> Result<()> {
        let format = format_of(path)?;
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        if format == Format::Parquet {
            return self.read_parquet(file, path, each);
        }
        let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        let reader: Box<dyn Read> = if gz { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
        let reader = BufReader::with_capacity(1 << 20, reader);
        match format {
            Format::Text => self.read_text(reader, path, each),
            Format::Jsonl => self.read_jsonl(reader, path, each),
            Format::Parquet => unreachable!("read above"),
        }
    }

    fn read_text(&mut self, mut reader: impl Read, path: &Path, mut each: impl FnMut(String) -> Result<()>) -> Result<()> {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
        match String::from_utf8(bytes) {
            Ok(text) if text.is_empty() => self.bad(format!("{}: the file is empty", path.display())),
            Ok(text) => each(text),
            Err(e) => self.bad(format!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to())),
        }
    }

    fn read_jsonl(&mut self, mut reader: impl BufRead, path: &Path, mut each: impl FnMut(String) -> Result<()>) -> Result<()> {
        let field = self.text_field;
        let mut line = Vec::new();
        let mut number = 0u64;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            number += 1;
            let at = format!("{}, line {number}", path.display());
            let text = match std::str::from_utf8(&line) {
                Ok(t) => t.trim(),
                Err(e) => {
                    self.bad(format!("{at}: not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1))?;
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(text) {
                Ok(record) => match record.get(field) {
                    Some(Value::String(s)) => each(s.clone())?,
                    Some(other) => self.bad(format!("{at}: field `{field}` is {}, not a string", kind(other)))?,
                    None => self.bad(format!("{at}: no field `{field}`"))?,
                },
                Err(e) => self.bad(format!("{at}: not a JSON object: {e}"))?,
            }
        }
    }

    fn read_parquet(&mut self, file: File, path: &Path, mut each: impl FnMut(String) -> Result<()>) -> Result<()> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::Field;
        use parquet::schema::types::Type;
        let field = self.text_field;
        let reader = SerializedFileReader::new(file).map_err(|e| anyhow!("{}: not a readable parquet file: {e}", path.display()))?;
        let schema = reader.metadata().file_metadata().schema();
        let Some(column) = schema.get_fields().iter().find(|f| f.name() == field) else {
            let names: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
            bail!("{}: no column `{field}` (its columns: {})", path.display(), names.join(", "));
        };
        let projection = Type::group_type_builder(schema.name())
            .with_fields(vec![column.clone()])
            .build()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let rows = reader.get_row_iter(Some(projection)).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for (i, row) in rows.enumerate() {
            let at = format!("{}, row {}", path.display(), i + 1);
            // A row that does not decode is a damaged file, not a bad record.
            let row = row.map_err(|e| anyhow!("{at}: {e}"))?;
            match row.get_column_iter().next().map(|(_, value)| value) {
                Some(Field::Str(text)) => each(text.clone())?,
                Some(Field::Null) | None => self.bad(format!("{at}: `{field}` is null"))?,
                Some(other) => self.bad(format!("{at}: `{field}` is not a string but {other}"))?,
            }
        }
        Ok(())
    }

    /// A record `what` describes cannot be read: an error, or (skipping) counted and, for the
    /// first few, logged.
    fn bad(&mut self, what: String) -> Result<()> {
        if !self.skip_bad_records {
            bail!("{what} (set data.skip_bad_records = true to skip such records)");
        }
        self.skipped.records += 1;
        if self.skipped.records <= 10 {
            tracing::warn!("skipped: {what}");
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
