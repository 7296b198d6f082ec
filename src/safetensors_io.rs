//! Reading and writing `.safetensors` files.
//!
//! Writing streams: the header is computed from names, dtypes and shapes alone, then the
//! tensors' bytes are fetched (e.g. copied off the device) and written in small batches of
//! neighbours (at most 1/32 of the file or 64 MiB, or one tensor where that is larger), so a
//! save never holds more than one batch beyond what the caller already has. The SHA-256 of the
//! file is computed while writing. The layout (tensors ordered by name, header padded to 8 bytes)
//! is the one the `safetensors` crate itself produces.
//!
//! Reading validates the header with the `safetensors` crate (through a memory map of the file)
//! before touching any tensor: a header length past the end, offsets past the end, overlapping
//! or gapped tensors, byte sizes that disagree with dtype and shape, and trailing bytes are all
//! refused, and nothing the header claims is allocated up front. Tensors are then read with
//! positioned reads straight into their buffers, in blocks spread over the threads, rather than
//! copied out of the map: faulting mapped pages in cost more than the copy itself (a 0.8 GB
//! optimizer file took ~0.5 s through the map on the project's VM, ~0.3 s read this way), and a
//! file truncated after opening gives a read error instead of a SIGBUS.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData, Transaction};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::buffer::Dst;

/// Errors reading a safetensors file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is missing")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype:?}; kiln reads F32, F16 and BF16")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: Dtype,
    },
}

/// A tensor's little-endian bytes: an owned buffer, or tensor data fetched from a device
/// (written as it is, without another copy).
pub enum TensorBytes {
    Owned(Vec<u8>),
    Data(burn::tensor::TensorData),
}

impl TensorBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Owned(v) => v,
            TensorBytes::Data(d) => d.as_bytes(),
        }
    }
}

impl From<Vec<u8>> for TensorBytes {
    fn from(v: Vec<u8>) -> Self {
        TensorBytes::Owned(v)
    }
}

/// One tensor to write: its name, dtype, shape, and where its little-endian bytes come from
/// when the writer reaches it.
pub struct PendingTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub source: TensorSource,
}

/// Where a pending tensor's bytes come from.
pub enum TensorSource {
    /// Made on the host when the writer reaches the tensor.
    Host(Box<dyn FnOnce() -> TensorBytes + Send>),
    /// An f32 device tensor, which adds itself to a read [`Transaction`]. The writer reads a
    /// batch of neighbours off the device in one transaction: on a GPU every read waits for the
    /// kernels queued before it, and a save runs next to training, so a read per tensor (~330
    /// for a GPT-2-small-sized run) would wait behind the training kernels ~330 times.
    Device(Box<dyn FnOnce(Transaction) -> Transaction + Send>),
}

impl PendingTensor {
    /// An f32 tensor whose values are already on the host.
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            dtype: Dtype::F32,
            shape,
            source: TensorSource::Host(Box::new(move || f32_bytes(&values).into())),
        }
    }

    /// A tensor whose little-endian bytes are already on the host.
    pub fn from_bytes(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            source: TensorSource::Host(Box::new(move || bytes.into())),
        }
    }

    pub fn byte_len(&self) -> usize {
        let bits = self.shape.iter().product::<usize>() * self.dtype.bitsize();
        bits / 8
    }
}

/// Size and SHA-256 of a written file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header bytes (8-byte length prefix included) for `tensors` in the given order.
fn header(metadata: &BTreeMap<String, String>, tensors: &[PendingTensor]) -> Vec<u8> {
    #[derive(Serialize)]
    struct Info<'a> {
        dtype: Dtype,
        shape: &'a [usize],
        data_offsets: (usize, usize),
    }
    fn text<T: Serialize + ?Sized>(value: &T) -> String {
        serde_json::to_string(value).expect("names, string maps and infos serialize")
    }
    // Entries are written as text in order (`__metadata__` first, then tensors by offset) and
    // each info straight from the struct, keeping its field order: through serde_json's `Value`
    // both orders would be sorted, and the header would differ from the crate's.
    let mut entries = Vec::with_capacity(tensors.len() + 1);
    if !metadata.is_empty() {
        entries.push(format!("\"__metadata__\":{}", text(metadata)));
    }
    let mut offset = 0;
    for t in tensors {
        let n = t.byte_len();
        let info = Info {
            dtype: t.dtype,
            shape: &t.shape,
            data_offsets: (offset, offset + n),
        };
        entries.push(format!("{}:{}", text(&t.name), text(&info)));
        offset += n;
    }
    let json = format!("{{{}}}", entries.join(","));
    let mut bytes = json.into_bytes();
    let padded = bytes.len().next_multiple_of(8);
    bytes.resize(padded, b' ');
    let mut out = Vec::with_capacity(8 + padded);
    out.extend_from_slice(&(padded as u64).to_le_bytes());
    out.extend_from_slice(&bytes);
    out
}

/// Writes a safetensors file to `out`, tensors sorted by name; returns its size and SHA-256.
/// The caller owns durability (fsync) and naming; see `checkpoint::storage`.
pub fn write_to(
    out: &mut dyn Write,
    metadata: &BTreeMap<String, String>,
    mut tensors: Vec<PendingTensor>,
) -> std::io::Result<FileDigest> {
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = tensors.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("duplicate tensor name `{}`", w[0].name),
        ));
    }
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let head = header(metadata, &tensors);
    out.write_all(&head)?;
    hasher.update(&head);
    written += head.len() as u64;
    let data_bytes: usize = tensors.iter().map(PendingTensor::byte_len).sum();
    let budget = (data_bytes / 32).min(64 << 20);
    let mut rest = tensors.into_iter().peekable();
    while let Some(first) = rest.next() {
        let mut size = first.byte_len();
        let mut batch = vec![first];
        while let Some(next) = rest.peek()
            && size + next.byte_len() <= budget
        {
            size += next.byte_len();
            batch.extend(rest.next());
        }
        for (name, expected, bytes) in fetch(batch)? {
            let bytes = bytes.as_slice();
            if bytes.len() != expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("tensor `{name}` produced {} bytes, expected {expected}", bytes.len()),
                ));
            }
            out.write_all(bytes)?;
            hasher.update(bytes);
            written += bytes.len() as u64;
        }
    }
    out.flush()?;
    Ok(FileDigest {
        bytes: written,
        sha256: hex(&hasher.finalize()),
    })
}

/// The bytes of a batch of tensors, in order, with each one's name and expected size. The
/// batch's device tensors are read in one transaction.
fn fetch(batch: Vec<PendingTensor>) -> std::io::Result<Vec<(String, usize, TensorBytes)>> {
    let mut transaction = Transaction::default();
    let mut on_device = 0;
    let mut fetched = Vec::with_capacity(batch.len());
    for t in batch {
        let expected = t.byte_len();
        let bytes = match t.source {
            TensorSource::Host(make) => Some(make()),
            TensorSource::Device(register) => {
                transaction = register(transaction);
                on_device += 1;
                None
            }
        };
        fetched.push((t.name, expected, bytes));
    }
    // An empty transaction is not valid on every backend; skip it.
    let mut read = if on_device == 0 {
        Vec::new()
    } else {
        transaction.try_execute().map_err(|e| {
            std::io::Error::other(format!("cannot read tensors off the device: {e:?}"))
        })?
    }
    .into_iter();
    fetched
        .into_iter()
        .map(|(name, expected, bytes)| {
            let bytes = match bytes {
                Some(b) => b,
                None => f32_data_bytes(read.next().expect("one result per registered tensor")),
            };
            Ok((name, expected, bytes))
        })
        .collect()
}

/// Device tensor data as little-endian f32 bytes, without a copy where it already is that.
fn f32_data_bytes(data: TensorData) -> TensorBytes {
    if data.dtype() == DType::F32 && cfg!(target_endian = "little") {
        return TensorBytes::Data(data);
    }
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32 above");
    f32_bytes(&values).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 and size of a file on disk, read in 1 MiB blocks.
pub fn digest_file(path: &Path) -> std::io::Result<FileDigest> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok(FileDigest {
        bytes: total,
        sha256: hex(&hasher.finalize()),
    })
}

/// An open safetensors file whose header has been validated; tensors are read on request.
pub struct SafetensorsFile {
    path: PathBuf,
    /// Tensors are read with positioned reads, so threads can share it.
    file: File,
    data_start: usize,
    metadata: Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).finish()
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        let invalid = |reason: String| ReadError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| ReadError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if len < 8 {
            return Err(invalid(format!("{len} bytes is shorter than the 8-byte header length")));
        }
        // The map lets the `safetensors` crate validate the header against the file's length
        // without reading the data; it is dropped before this returns.
        // SAFETY: the map is read-only; kiln never writes a file in place (saves go to a new
        // file that is renamed over the old name), so the mapped bytes do not change under us.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ReadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (n, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| invalid(describe(&e, len)))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` map (empty if absent).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.metadata
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Tensor names with their dtype, shape and byte size, ordered by name.
    pub fn tensors(&self) -> Vec<(String, Dtype, Vec<usize>, usize)> {
        let mut out: Vec<_> = self
            .metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let size = info.data_offsets.1 - info.data_offsets.0;
                (name, info.dtype, info.shape.clone(), size)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// One tensor's dtype, shape and place in the file, without reading it.
    pub fn info(&self, name: &str) -> Result<&TensorInfo, ReadError> {
        self.metadata.info(name).ok_or_else(|| ReadError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// One tensor's info and little-endian bytes.
    pub fn read_raw(&self, name: &str) -> Result<(&TensorInfo, Vec<u8>), ReadError> {
        let info = self.info(name)?;
        Ok((info, self.read_bytes(info)?))
    }

    /// The little-endian bytes of the tensor `info` (from [`SafetensorsFile::info`]) describes.
    pub fn read_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, ReadError> {
        let mut bytes = vec![0u8; info.data_offsets.1 - info.data_offsets.0];
        self.read_tensor(info, &mut bytes)?;
        Ok(bytes)
    }

    /// One tensor as f32 values, converting from F16 or BF16; its shape must be `expected`
    /// (pass `None` to accept any shape). Returns the values and the shape.
    pub fn read_f32(
        &self,
        name: &str,
        expected: Option<&[usize]>,
    ) -> Result<(Vec<f32>, Vec<usize>), ReadError> {
        let info = self.shaped_info(name, expected)?;
        let values = match info.dtype {
            // Straight into the returned buffer: no intermediate copy of the bytes.
            Dtype::F32 => {
                let mut values = vec![0f32; (info.data_offsets.1 - info.data_offsets.0) / 4];
                self.read_tensor(info, bytemuck::cast_slice_mut(&mut values))?;
                if cfg!(target_endian = "big") {
                    for v in &mut values {
                        *v = f32::from_bits(u32::from_le(v.to_bits()));
                    }
                }
                values
            }
            Dtype::F16 => self
                .read_bytes(info)?
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => self
                .read_bytes(info)?
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            dtype => {
                return Err(ReadError::Dtype {
                    path: self.path.clone(),
                    name: name.to_string(),
                    dtype,
                });
            }
        };
        Ok((values, info.shape.clone()))
    }

    /// A 2-D tensor of shape `[rows, cols]` as f32 values transposed to `[cols, rows]`, as a
    /// Linear weight (or its optimizer state) goes from Hugging Face to Burn layout. An F32
    /// tensor is transposed on its way in: each task reads a strip of rows into a buffer that
    /// stays in cache and scatters it into the output, so the values pass through memory once,
    /// and the output is never cleared first (reading, then transposing into a cleared buffer
    /// wrote the memory three times; that was most of a resume's time besides hashing).
    pub fn read_f32_transposed(&self, name: &str, [rows, cols]: [usize; 2]) -> Result<Vec<f32>, ReadError> {
        use rayon::prelude::*;
        // Rows per task (a 1 MiB buffer at 2,048 columns), and columns per inner block: each
        // output row then gets 512 bytes in one go, and a block's 16 rows stay in L1.
        const STRIP: usize = 128;
        const BLOCK: usize = 16;
        let info = self.shaped_info(name, Some(&[rows, cols]))?;
        if info.dtype != Dtype::F32 {
            let (values, _) = self.read_f32(name, Some(&[rows, cols]))?;
            return Ok(crate::params::transpose(&values, rows, cols));
        }
        let len = rows * cols;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = Dst::uninit(&mut out.spare_capacity_mut()[..len]);
        let tensor_start = self.data_start + info.data_offsets.0;
        (0..rows.div_ceil(STRIP)).into_par_iter().try_for_each_init(Vec::new, |strip, s| {
            let r0 = s * STRIP;
            let height = STRIP.min(rows - r0);
            strip.resize(height * cols, 0f32);
            read_exact_at(&self.file, bytemuck::cast_slice_mut(strip), (tensor_start + r0 * cols * 4) as u64)
                .map_err(|source| ReadError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            for c0 in (0..cols).step_by(BLOCK) {
                let width = BLOCK.min(cols - c0);
                for (r, row) in strip.chunks_exact(cols).enumerate() {
                    for (j, &v) in row[c0..c0 + width].iter().enumerate() {
                        let v = f32::from_bits(u32::from_le(v.to_bits()));
                        // SAFETY: element (r0 + r, c0 + j) of the input belongs to this strip
                        // alone, so no two tasks write one element; nothing reads `out` meanwhile.
                        unsafe { dst.write((c0 + j) * rows + r0 + r, v) };
                    }
                }
            }
            Ok(())
        })?;
        // SAFETY: the strips cover every row and each writes every column of its rows, so all
        // `len` elements are initialised (an error returned above, leaving `out` empty).
        unsafe { out.set_len(len) };
        Ok(out)
    }

    /// The info of tensor `name`, which must have shape `expected` (any shape if `None`).
    fn shaped_info(&self, name: &str, expected: Option<&[usize]>) -> Result<&TensorInfo, ReadError> {
        let info = self.info(name)?;
        match expected {
            Some(expected) if info.shape != expected => Err(ReadError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                found: info.shape.clone(),
                expected: expected.to_vec(),
            }),
            _ => Ok(info),
        }
    }

    /// Fills `buf` with the bytes of the tensor `info` describes.
    fn read_tensor(&self, info: &TensorInfo, buf: &mut [u8]) -> Result<(), ReadError> {
        self.read_at(self.data_start + info.data_offsets.0, buf)
            .map_err(|source| ReadError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Fills `buf` from the file at byte `offset`, in blocks spread over rayon's threads: the
    /// time goes to the kernel faulting in and zeroing the fresh buffer and copying into it,
    /// and both scale with cores.
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        use rayon::prelude::*;
        const BLOCK: usize = 512 << 10;
        buf.par_chunks_mut(BLOCK)
            .enumerate()
            .try_for_each(|(i, block)| read_exact_at(&self.file, block, (offset + i * BLOCK) as u64))
    }
}

/// Tensors by their Hugging Face names, as stored (a checkpoint's weights file).
impl crate::params::ParamSource for &SafetensorsFile {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self.read_f32(name, Some(hf_shape)).map(|(values, _)| values).map_err(|e| e.to_string())
    }

    fn transposed_values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        let &[rows, cols] = hf_shape else {
            return Err(format!("{name}: a Linear weight has two dimensions, not {hf_shape:?}"));
        };
        self.read_f32_transposed(name, [rows, cols]).map_err(|e| e.to_string())
    }
}

/// Fills `buf` from `file` at `offset` without moving a shared cursor.
#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A human description of a header problem.
fn describe(e: &safetensors::SafeTensorError, file_len: u64) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooLarge | E::InvalidHeaderLength => {
            format!("the header length field points past the end of the {file_len}-byte file")
        }
        E::MetadataIncompleteBuffer => {
            "the tensors' byte ranges do not end exactly at the end of the file (truncated, or trailing bytes)".to_string()
        }
        E::InvalidOffset(name) => format!(
            "tensor `{name}` has byte offsets that overlap another tensor, leave a gap, or run backwards"
        ),
        E::TensorInvalidInfo => {
            "a tensor's byte size does not match its dtype and shape".to_string()
        }
        E::ValidationOverflow => "a tensor's shape overflows when multiplied out".to_string(),
        other => other.to_string(),
    }
}
