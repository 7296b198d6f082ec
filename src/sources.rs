//! The documents of a dataset's sources: which files a `[[data.sources]]` entry names (a file,
//! a directory or a glob), and the documents each file holds.
//!
//! - `.txt`: the whole file is one document (UTF-8), handed whole or, where the tokenizer
//!   encodes pieces exactly, in pieces of about [`TEXT_PIECE_BYTES`] cut after a newline (see
//!   [`DocumentReader::in_pieces`]), so a text file of any size streams.
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

/// A `.txt` read in pieces is cut after the first exact boundary past this many bytes.
pub const TEXT_PIECE_BYTES: usize = 8 << 20;

/// Text files are read in blocks of this many bytes.
const TEXT_BLOCK: usize = 1 << 20;

/// A document, or a piece of one: a `.txt` read in pieces hands its text over in order, only
/// the last piece ending the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text {
    pub text: String,
    pub ends_document: bool,
}

impl Text {
    fn whole(text: String) -> Self {
        Self { text, ends_document: true }
    }
}

/// Reads documents from files, one field of them, refusing or counting bad records.
pub struct DocumentReader<'a> {
    text_field: &'a str,
    skip_bad_records: bool,
    /// `.txt` files are handed over in pieces of about this many bytes.
    text_pieces: Option<usize>,
    /// What was skipped so far.
    pub skipped: Skipped,
}

impl<'a> DocumentReader<'a> {
    pub fn new(text_field: &'a str, skip_bad_records: bool) -> Self {
        Self { text_field, skip_bad_records, text_pieces: None, skipped: Skipped::default() }
    }

    /// Hands `.txt` files over in pieces of about `bytes`, each cut after a newline that
    /// stands alone between non-space characters ([`crate::tokenizer::is_exact_cut`]), instead
    /// of whole. A file is checked to be non-empty UTF-8 in a first pass, so a bad one is
    /// refused (or skipped) before any piece of it is handed over.
    pub fn in_pieces(mut self, bytes: usize) -> Self {
        // Pieces are at least a read block, so that cutting them off the front stays cheap.
        self.text_pieces = Some(bytes.max(TEXT_BLOCK));
        self
    }

    /// Reads the documents of `path` in order, handing each to `each` (which may stop the
    /// reading by returning an error).
    pub fn read(&mut self, path: &Path, mut each: impl FnMut(Text) -> Result<()>) -> Result<()> {
        let format = format_of(path)?;
        match format {
            Format::Parquet => {
                let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
                self.read_parquet(file, path, |t| each(Text::whole(t)))
            }
            Format::Jsonl => self.read_jsonl(open(path)?, path, |t| each(Text::whole(t))),
            Format::Text => match self.text_pieces {
                None => self.read_text(open(path)?, path, each),
                Some(bytes) => match check_text(open(path)?, path)? {
                    Some(problem) => self.bad(problem),
                    None => read_text_pieces(open(path)?, path, bytes, each),
                },
            },
        }
    }

    fn read_text(&mut self, mut reader: impl Read, path: &Path, mut each: impl FnMut(Text) -> Result<()>) -> Result<()> {
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
        match String::from_utf8(bytes) {
            Ok(text) if text.is_empty() => self.bad(empty(path)),
            Ok(text) => each(Text::whole(text)),
            Err(e) => self.bad(not_utf8(path, e.utf8_error().valid_up_to() as u64)),
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

/// A file's bytes, through gzip for a `.gz`.
fn open(path: &Path) -> Result<BufReader<Box<dyn Read>>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let gz = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    let reader: Box<dyn Read> = if gz { Box::new(flate2::read::MultiGzDecoder::new(file)) } else { Box::new(file) };
    Ok(BufReader::with_capacity(1 << 20, reader))
}

fn empty(path: &Path) -> String {
    format!("{}: the file is empty", path.display())
}

fn not_utf8(path: &Path, offset: u64) -> String {
    format!("{}: not UTF-8 text (invalid byte at offset {offset})", path.display())
}

/// Reads into `buf` until it is full or the input ends; the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(anyhow!(e).context(format!("cannot read {}", path.display()))),
        }
    }
    Ok(n)
}

/// What is wrong with a text file as a document (empty, or not UTF-8), read in one streaming
/// pass; `None` when nothing is.
fn check_text(mut reader: impl Read, path: &Path) -> Result<Option<String>> {
    let mut buf = vec![0u8; TEXT_BLOCK];
    // Bytes of a character cut by the end of the previous block, moved to the front.
    let (mut carry, mut offset, mut total) = (0usize, 0u64, 0u64);
    loop {
        let n = fill(&mut reader, &mut buf[carry..], path)?;
        total += n as u64;
        let len = carry + n;
        match std::str::from_utf8(&buf[..len]) {
            Ok(_) => carry = 0,
            Err(e) if e.error_len().is_none() && n > 0 => {
                // An incomplete character at the end: complete it from the next block.
                let valid = e.valid_up_to();
                buf.copy_within(valid..len, 0);
                offset += valid as u64;
                carry = len - valid;
                continue;
            }
            Err(e) => return Ok(Some(not_utf8(path, offset + e.valid_up_to() as u64))),
        }
        offset += len as u64;
        if n == 0 {
            return Ok((total == 0).then(|| empty(path)));
        }
    }
}

/// Hands a text file checked by [`check_text`] to `each` in pieces, each cut at the first
/// place past `bytes` that [`crate::tokenizer::is_exact_cut`] allows (the last piece is the
/// rest); a text without such a place goes as one piece.
fn read_text_pieces(mut reader: impl Read, path: &Path, bytes: usize, mut each: impl FnMut(Text) -> Result<()>) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut block = vec![0u8; TEXT_BLOCK];
    let mut want = bytes;
    // Places before this have been looked at for a cut already.
    let mut scanned = bytes;
    loop {
        let mut ended = false;
        while buf.len() < want {
            let n = fill(&mut reader, &mut block, path)?;
            buf.extend_from_slice(&block[..n]);
            if n < block.len() {
                ended = true;
                break;
            }
        }
        if ended {
            let text = String::from_utf8(buf).map_err(|_| anyhow!("{} changed while it was read", path.display()))?;
            return each(Text::whole(text));
        }
        // The whole characters read so far, and the first place past those looked at to cut them.
        let valid = match std::str::from_utf8(&buf) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&buf[..e.valid_up_to()]).expect("valid up to there"),
        };
        match (scanned.min(valid.len())..valid.len()).find(|&i| crate::tokenizer::is_exact_cut(valid, i)) {
            Some(cut) => {
                let rest = buf.split_off(cut);
                let text = String::from_utf8(std::mem::replace(&mut buf, rest)).map_err(|_| anyhow!("{} changed while it was read", path.display()))?;
                each(Text { text, ends_document: false })?;
                (want, scanned) = (bytes, bytes);
            }
            None => (want, scanned) = (buf.len() + bytes, valid.len()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces_of(path: &Path, bytes: usize) -> Result<Vec<Text>> {
        let mut got = Vec::new();
        DocumentReader::new("text", false).in_pieces(bytes).read(path, |t| {
            got.push(t);
            Ok(())
        })?;
        Ok(got)
    }

    #[test]
    fn a_text_file_in_pieces_is_the_file_cut_only_at_exact_places() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..250_000).map(|i| format!("línea {i}{}\n", ["", " ", "\t", "  ", "\r", "\n"][i % 6])).collect::<String>() + "日本";
        let path = dir.path().join("a.txt");
        std::fs::write(&path, &text).unwrap();
        assert!(text.len() > 3 * TEXT_BLOCK && text.len() < 4 * TEXT_BLOCK);
        for bytes in [TEXT_BLOCK, 3 * TEXT_BLOCK / 2, 4 * TEXT_BLOCK] {
            let got = pieces_of(&path, bytes).unwrap();
            assert_eq!(got.iter().map(|t| t.text.as_str()).collect::<String>(), text, "pieces of {bytes}");
            assert!(got.last().unwrap().ends_document && got[..got.len() - 1].iter().all(|t| !t.ends_document));
            let mut at = 0;
            for t in &got[..got.len() - 1] {
                at += t.text.len();
                assert!(crate::tokenizer::is_exact_cut(&text, at), "a cut at {at}");
                assert!(t.text.len() >= bytes);
            }
            if bytes >= text.len() {
                assert_eq!(got.len(), 1);
            } else {
                assert!(got.len() >= text.len() / (bytes + TEXT_BLOCK), "{} pieces of {bytes}", got.len());
            }
        }
        // Through gzip, the same.
        let gz = dir.path().join("a.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::default());
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        enc.finish().unwrap();
        assert_eq!(pieces_of(&gz, TEXT_BLOCK).unwrap(), pieces_of(&path, TEXT_BLOCK).unwrap());
    }

    #[test]
    fn a_bad_text_file_is_refused_before_any_piece_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        // Valid for three blocks of the check, then a byte that is not UTF-8.
        let mut bytes = "word\n".repeat(700_000).into_bytes();
        bytes.extend([b'x', 0xFF, b'\n']);
        std::fs::write(&path, &bytes).unwrap();
        let mut handed = 0;
        let err = DocumentReader::new("text", false).in_pieces(TEXT_BLOCK).read(&path, |_| {
            handed += 1;
            Ok(())
        });
        let err = err.unwrap_err().to_string();
        assert!(err.contains("bad.txt") && err.contains(&format!("offset {}", 3_500_001)), "{err}");
        assert_eq!(handed, 0);
        // A character cut by a block's end is not an error, and an empty file is one.
        let split = dir.path().join("split.txt");
        let mut text = "a".repeat((1 << 20) - 1);
        text.push_str("é and more\nafter");
        std::fs::write(&split, &text).unwrap();
        assert_eq!(pieces_of(&split, 1 << 22).unwrap(), vec![Text { text, ends_document: true }]);
        std::fs::write(&path, "").unwrap();
        assert!(pieces_of(&path, TEXT_BLOCK).unwrap_err().to_string().contains("empty"));
        // Skipping, the whole file is skipped and counted.
        std::fs::write(&path, [b'a', 0xC0, b'\n']).unwrap();
        let mut reader = DocumentReader::new("text", true).in_pieces(1);
        reader.read(&path, |_| panic!("a piece of a bad file")).unwrap();
        assert_eq!(reader.skipped.records, 1);
    }
}
