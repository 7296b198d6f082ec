//! GGUF v3, llama.cpp's model file, written and read without llama.cpp: a header (magic,
//! version, counts), typed metadata, one description per tensor (name, dimensions in ggml's
//! order, type, offset), then the tensors' data, each starting at a multiple of
//! `general.alignment` (32 unless the file says otherwise).
//!
//! Reading treats the file as hostile: every count and length is checked against what is left
//! of the file before anything is allocated for it, dimensions and offsets are checked for
//! overflow and against the data section, and a problem is an error naming the file, never a
//! panic. The tensor types are those [`crate::quantize`] writes: F32, F16, BF16, Q8_0, Q4_0.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on a tensor's dimensions.
const MAX_DIMS: usize = 4;

/// A metadata value, typed as GGUF types it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// The items' type and the items (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF's metadata value type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Bytes one value of a fixed-size type takes (`None`: strings and arrays).
    fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// An array of strings.
    pub fn strings(items: impl IntoIterator<Item = String>) -> Self {
        Value::Array(ValueType::String, items.into_iter().map(Value::String).collect())
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An unsigned or non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// How `kiln inspect` shows it: scalars as they are, arrays by type and length with their
    /// first items.
    pub fn display(&self) -> String {
        match self {
            Value::String(s) => format!("{s:?}"),
            Value::Array(t, items) => {
                let head: Vec<String> = items.iter().take(4).map(Value::display).collect();
                let more = if items.len() > 4 { ", ..." } else { "" };
                format!("[{:?} x {}] [{}{more}]", t, items.len(), head.join(", "))
            }
            Value::U8(v) => v.to_string(),
            Value::I8(v) => v.to_string(),
            Value::U16(v) => v.to_string(),
            Value::I16(v) => v.to_string(),
            Value::U32(v) => v.to_string(),
            Value::I32(v) => v.to_string(),
            Value::U64(v) => v.to_string(),
            Value::I64(v) => v.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
        }
    }
}

/// ggml's tensor types that kiln writes and reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q8_0,
    BF16,
}

impl TensorType {
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q8_0 => 8,
            TensorType::BF16 => 30,
        }
    }

    pub fn from_id(id: u32) -> Option<Self> {
        [TensorType::F32, TensorType::F16, TensorType::Q4_0, TensorType::Q8_0, TensorType::BF16].into_iter().find(|t| t.id() == id)
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::Q4_0 => "Q4_0",
            TensorType::Q8_0 => "Q8_0",
            TensorType::BF16 => "BF16",
        }
    }

    /// Values per block, and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::BF16 => (1, 2),
            TensorType::Q8_0 => (32, 34),
            TensorType::Q4_0 => (32, 18),
        }
    }

    /// Bytes of a tensor of `shape` (rows of its last dimension), if its rows divide into
    /// whole blocks and the size does not overflow.
    pub fn byte_len(self, shape: &[usize]) -> Option<u64> {
        let (values, bytes) = self.block();
        let row = *shape.last().unwrap_or(&1);
        if row % values != 0 {
            return None;
        }
        let count = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
        (count / values as u64).checked_mul(bytes as u64)
    }
}

/// One tensor's description in the header. `shape` is in row-major (numpy, Hugging Face) order;
/// the file stores it reversed, as ggml's `ne`.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: TensorType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn byte_len(&self) -> u64 {
        self.ty.byte_len(&self.shape).expect("checked when the info was made")
    }
}

fn align(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

/// Writes a GGUF file to `out`: `metadata` in order, then the tensors, whose bytes
/// `data(i)` produces one at a time in the order of `tensors` (name, row-major shape, type), so
/// only one tensor's bytes are in memory at once. Returns the tensors' descriptions.
pub fn write(
    out: &mut dyn Write,
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, TensorType)],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<Vec<TensorInfo>> {
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, v)) => v.as_u64().filter(|a| a.is_power_of_two()).context("general.alignment must be a power of two")?,
        None => DEFAULT_ALIGNMENT,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for (name, shape, ty) in tensors {
        if shape.is_empty() || shape.len() > MAX_DIMS {
            bail!("tensor `{name}`: GGUF holds 1 to {MAX_DIMS} dimensions, not {}", shape.len());
        }
        let len = ty.byte_len(shape).ok_or_else(|| anyhow!("tensor `{name}` {shape:?}: rows of {} values do not divide into {} blocks", shape.last().unwrap_or(&0), ty.name()))?;
        infos.push(TensorInfo { name: name.clone(), shape: shape.clone(), ty: *ty, offset });
        offset = align(offset + len, alignment);
    }

    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend(VERSION.to_le_bytes());
    header.extend((tensors.len() as u64).to_le_bytes());
    header.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend((value.value_type() as u32).to_le_bytes());
        put_value(&mut header, value)?;
    }
    for info in &infos {
        put_string(&mut header, &info.name);
        header.extend((info.shape.len() as u32).to_le_bytes());
        for &d in info.shape.iter().rev() {
            header.extend((d as u64).to_le_bytes());
        }
        header.extend(info.ty.id().to_le_bytes());
        header.extend(info.offset.to_le_bytes());
    }
    header.resize(align(header.len() as u64, alignment) as usize, 0);
    out.write_all(&header)?;

    let mut written = 0u64;
    for (i, info) in infos.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != info.byte_len() {
            bail!("tensor `{}`: {} bytes produced for {} of {} {:?}", info.name, bytes.len(), info.byte_len(), info.ty.name(), info.shape);
        }
        out.write_all(&vec![0u8; (info.offset - written) as usize])?;
        out.write_all(&bytes)?;
        written = info.offset + bytes.len() as u64;
    }
    out.write_all(&vec![0u8; (align(written, alignment) - written) as usize])?;
    Ok(infos)
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) -> Result<()> {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend(v.to_le_bytes()),
        Value::U16(v) => out.extend(v.to_le_bytes()),
        Value::I16(v) => out.extend(v.to_le_bytes()),
        Value::U32(v) => out.extend(v.to_le_bytes()),
        Value::I32(v) => out.extend(v.to_le_bytes()),
        Value::F32(v) => out.extend(v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(ty, items) => {
            if *ty == ValueType::Array {
                bail!("kiln does not write arrays of arrays");
            }
            out.extend((*ty as u32).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                if item.value_type() != *ty {
                    bail!("an array of {ty:?} holds a {:?}", item.value_type());
                }
                put_value(out, item)?;
            }
        }
        Value::U64(v) => out.extend(v.to_le_bytes()),
        Value::I64(v) => out.extend(v.to_le_bytes()),
        Value::F64(v) => out.extend(v.to_le_bytes()),
    }
    Ok(())
}

/// A GGUF file opened for reading: its metadata and tensor descriptions parsed and checked,
/// its data memory-mapped.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
    map: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is only read, and every read is bounds-checked against its length; a
        // file changed underneath yields other bytes, not memory unsafety for `u8` reads.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(path, map).with_context(|| format!("{} is not a valid GGUF file", path.display()))
    }

    fn parse(path: &Path, map: Mmap) -> Result<Self> {
        let mut r = Reader { bytes: &map, pos: 0 };
        if r.take(4)? != MAGIC {
            bail!("it does not start with the GGUF magic");
        }
        let version = r.u32()?;
        if version != 2 && version != 3 {
            bail!("GGUF version {version}; kiln reads versions 2 and 3");
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        // Each entry takes at least its key's or name's 8-byte length: counts beyond what the
        // file could hold are refused before anything is allocated for them.
        let left = r.left() as u64;
        if kv_count > left / 8 || tensor_count > left / 8 {
            bail!("it claims {kv_count} metadata entries and {tensor_count} tensors, more than its {} bytes can hold", map.len());
        }
        let mut metadata = Vec::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = r.string()?;
            let ty = r.value_type()?;
            let value = r.value(ty).with_context(|| format!("metadata `{key}`"))?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 20).context("general.alignment is not a power of two")?,
            None => DEFAULT_ALIGNMENT,
        };
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})");
            }
            let mut shape = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = r.u64()?;
                shape.push(usize::try_from(d).map_err(|_| anyhow!("tensor `{name}`: dimension {d} is too large"))?);
            }
            shape.reverse();
            let id = r.u32()?;
            let ty = TensorType::from_id(id).ok_or_else(|| anyhow!("tensor `{name}` has ggml type {id}, which kiln does not read (F32, F16, BF16, Q8_0, Q4_0)"))?;
            let offset = r.u64()?;
            if ty.byte_len(&shape).is_none() {
                bail!("tensor `{name}` {shape:?} does not divide into {} blocks, or is too large", ty.name());
            }
            if offset % alignment != 0 {
                bail!("tensor `{name}` starts at {offset}, not a multiple of the alignment {alignment}");
            }
            tensors.push(TensorInfo { name, shape, ty, offset });
        }
        let data_start = align(r.pos as u64, alignment);
        let data_len = (map.len() as u64).saturating_sub(data_start);
        for t in &tensors {
            let end = t.offset.checked_add(t.byte_len());
            if end.is_none_or(|end| end > data_len) {
                bail!("tensor `{}` ({} bytes at {}) runs past the end of the file: truncated?", t.name, t.byte_len(), t.offset);
            }
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(t) = tensors.iter().find(|t| !names.insert(t.name.as_str())) {
            bail!("tensor `{}` is listed twice", t.name);
        }
        Ok(Self { path: path.to_owned(), version, metadata, tensors, alignment, data_start, map })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's stored bytes.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_start + info.offset) as usize;
        &self.map[start..start + info.byte_len() as usize]
    }

    /// A tensor's values as f32 (dequantized), row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        Ok(crate::quants::dequantize(self.bytes(info), info.ty))
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            bail!("it ends {} bytes into a field of {n} bytes at offset {}: truncated", self.left(), self.pos);
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        if len > self.left() as u64 {
            bail!("a string of {len} bytes at offset {} is longer than the rest of the file", self.pos);
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("a string at offset {} is not UTF-8", self.pos))
    }

    fn value_type(&mut self) -> Result<ValueType> {
        let id = self.u32()?;
        ValueType::from_id(id).ok_or_else(|| anyhow!("unknown metadata value type {id} at offset {}", self.pos - 4))
    }

    fn value(&mut self, ty: ValueType) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("a bool of value {b}"),
            },
            ValueType::String => Value::String(self.string()?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Array => {
                let item = self.value_type()?;
                let count = self.u64()?;
                // The smallest item of its type bounds how many the rest of the file holds.
                let min = item.fixed_size().unwrap_or(8) as u64;
                if count > self.left() as u64 / min {
                    bail!("an array of {count} {item:?} is longer than the rest of the file");
                }
                if item == ValueType::Array {
                    bail!("arrays of arrays are not read");
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item)?);
                }
                Value::Array(item, items)
            }
        })
    }
}

/// Writes a whole GGUF file to `path` through a temporary file beside it, fsynced and then
/// given the name only if it is free (an existing file is never replaced).
pub fn write_file(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<usize>, TensorType)],
    data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<Vec<TensorInfo>> {
    use crate::checkpoint::storage::{LocalFs, write_temp};
    if path.symlink_metadata().is_ok() {
        bail!("{} already exists; kiln never overwrites a file", path.display());
    }
    let mut failure = None;
    let written = write_temp(&LocalFs, path, |w| match write(w, metadata, tensors, data) {
        Ok(infos) => Ok(infos),
        Err(e) => {
            failure = Some(e);
            Err(io::Error::other("GGUF write failed"))
        }
    });
    let (tmp, infos) = match (written, failure) {
        (_, Some(e)) => return Err(e.context(format!("cannot write {}", path.display()))),
        (Err(e), None) => return Err(anyhow!(e).context(format!("cannot write {}", path.display()))),
        (Ok(done), None) => done,
    };
    crate::convert::place_new(&LocalFs, &tmp, path)?;
    Ok(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_reads_back_with_its_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let metadata = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("llama.block_count".to_string(), Value::U32(2)),
            ("tokenizer.ggml.tokens".to_string(), Value::strings(["a".to_string(), "b".to_string()])),
        ];
        let values: Vec<f32> = (0..96).map(|i| i as f32 * 0.5 - 3.0).collect();
        let tensors = vec![("w".to_string(), vec![3, 32], TensorType::F32), ("v".to_string(), vec![5], TensorType::F32)];
        write_file(&path, &metadata, &tensors, |i| Ok(if i == 0 { crate::safetensors_io::f32_bytes(&values) } else { vec![0; 20] })).unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.metadata, metadata);
        assert_eq!(file.tensors[0].shape, vec![3, 32]);
        assert_eq!(file.tensors[1].offset % 32, 0);
        assert_eq!(file.read_f32("w").unwrap(), values);
        assert!(write_file(&path, &metadata, &tensors, |_| Ok(vec![])).is_err(), "an existing file is never replaced");
    }

    #[test]
    fn hostile_headers_are_refused_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.gguf");
        let metadata = vec![("general.name".to_string(), Value::String("x".into()))];
        write_file(&path, &metadata, &[("w".to_string(), vec![2, 32], TensorType::Q8_0)], |_| Ok(vec![0; 68])).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![("empty", vec![]), ("bad magic", b"GGML".iter().chain(&good[4..]).copied().collect())];
        let mut v = good.clone();
        v[4..8].copy_from_slice(&9u32.to_le_bytes());
        cases.push(("version", v));
        let mut v = good.clone();
        v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("tensor count", v));
        let mut v = good.clone();
        v[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        cases.push(("kv count", v));
        let mut v = good.clone();
        v[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push(("key length", v));
        // The last tensor's 68 bytes end 28 bytes before the file's padded end.
        cases.push(("truncated data", good[..good.len() - 40].to_vec()));
        for cut in [30, 45, 60] {
            cases.push(("truncated header", good[..cut].to_vec()));
        }
        for (what, bytes) in cases {
            let p = dir.path().join("bad.gguf");
            std::fs::write(&p, &bytes).unwrap();
            let err = GgufFile::open(&p).err().unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(format!("{err:#}").contains("bad.gguf"), "{what}: {err:#}");
        }
    }
}
