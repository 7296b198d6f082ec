//! Reading PyTorch checkpoints (`pytorch_model.bin`, `.pt`, `.pth`), safely.
//!
//! Hugging Face loaders fall back to these when a directory has no safetensors. The format is
//! the zip `torch.save` has written since PyTorch 1.6: `<root>/data.pkl`, a pickle describing
//! the state dict, next to one `<root>/data/<key>` entry per storage. A pickle is a program
//! for Python's unpickler and may call any Python function it names (`os.system`, say), so
//! kiln never runs it. The zip, the pickle and the strided tensor views are parsed by
//! tracel-ai's `pytorch-reader` (the reader behind burn-store), which only interprets what it
//! knows and keeps anything else as an opaque placeholder. kiln is stricter: before that
//! reader sees the file, [`scan_pickle`] walks the pickle's opcodes and refuses it unless every
//! global it names is one a state dict needs (the allow-list in [`allowed_global`]), so a
//! hostile file is an error naming what it tried to call rather than a file that loads.
//!
//! Everything is bounded by the file's size: only stored (uncompressed) entries are read, as
//! `torch.save` writes, so no entry expands past the file; no tensor may materialize more bytes
//! than the file holds (a stride-0 view could otherwise ask for any amount); and the scan
//! charges the copies the reader's memo makes against the pickle's length, so a small pickle
//! cannot make it build a large object tree. The older containers (the pre-1.6 pickle stream,
//! the TAR archive) are refused: re-save them with a current torch.
//!
//! The scan and the parse open the file separately; a file swapped in between is still only
//! parsed by a reader that executes nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result, anyhow, bail};
use pytorch_reader::{DType, FileFormat, OpCode, PytorchReader, Tensor};
use safetensors::Dtype;
use zip::{CompressionMethod, ZipArchive, ZipReadOptions};
use crate::weight_index::weight_files;

/// A directory's single PyTorch weights file.
pub const TORCH_WEIGHTS_FILE: &str = "pytorch_model.bin";
/// The index of a directory's sharded PyTorch weights (same shape as the safetensors index).
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// The storage classes `torch.save` names for typed storages (`torch.FloatStorage`, ...).
const STORAGES: [&str; 10] = [
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
];

/// The `torch.<dtype>` globals `_rebuild_tensor_v3` passes; exactly those the reader maps.
const DTYPES: [&str; 13] = [
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
    "uint64", "bool",
];

/// Whether a state dict's pickle may name the global `module.name`.
///
/// What current torch writes for `torch.save(state_dict)` (checked with `pickletools.dis`):
/// `collections.OrderedDict`; `torch._utils._rebuild_tensor_v2` with a typed storage class such
/// as `torch.FloatStorage`; `torch._utils._rebuild_parameter` for an `nn.Parameter`; and, for
/// dtypes without a typed storage (uint16/32/64), `torch._utils._rebuild_tensor_v3` with
/// `torch.storage.UntypedStorage` and a dtype such as `torch.uint16`. Dense tensors need no
/// layout global (`torch.serialization._get_layout` appears only for sparse ones), so none is
/// allowed. Matching is exact: `torch._utils\r` is not `torch._utils`.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_tensor_v3" | "_rebuild_parameter"),
        "torch" => STORAGES.contains(&name) || DTYPES.contains(&name),
        "torch.storage" => name == "UntypedStorage",
        _ => false,
    }
}

/// A value on the scan's model of the unpickler's stack: the text of a string literal (all
/// `STACK_GLOBAL` may take its operands from), and upper bounds on how many objects and
/// payload bytes the reader builds for it, which its memo copies are charged with.
#[derive(Clone, Default)]
struct Slot {
    text: Option<Rc<str>>,
    nodes: u64,
    bytes: u64,
}

impl Slot {
    fn other(nodes: u64, bytes: u64) -> Self {
        Self { text: None, nodes, bytes }
    }

    fn scalar() -> Self {
        Self::other(1, 0)
    }

    /// An object holding both (a string's text does not survive into a container).
    fn plus(self, other: Slot) -> Slot {
        Self::other(self.nodes.saturating_add(other.nodes), self.bytes.saturating_add(other.bytes))
    }
}

/// The pickle walked opcode by opcode with the unpickler's stack effects, executing nothing.
struct Scan<'a> {
    pickle: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    /// Stack heights at each open MARK, innermost last.
    marks: Vec<usize>,
    memo: HashMap<u32, Slot>,
    /// Objects and bytes the reader's memo fetches, `DUP` and memoized `BUILD` would copy.
    copied: u64,
    copy_budget: u64,
}

/// Checks a checkpoint's `data.pkl` before anything parses it: every GLOBAL and STACK_GLOBAL
/// must name an allowed global, a STACK_GLOBAL's operands must be resolvable to string
/// literals (directly, or through the memo), and the opcodes must form a pickle the reader can
/// parse within copy budgets tied to the pickle's length. Linear in the pickle's length.
pub fn scan_pickle(pickle: &[u8]) -> Result<()> {
    Scan {
        pickle,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
        // A torch pickle copies a few objects per tensor, each costing it far more bytes.
        copy_budget: 2 * pickle.len() as u64 + 4096,
    }
    .run()
}

impl<'a> Scan<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let pickle = self.pickle;
        let end = self.pos.checked_add(n).filter(|&end| end <= pickle.len()).ok_or_else(|| {
            anyhow!("the pickle ends inside an operand at byte {} (it is truncated or corrupted)", self.pos)
        })?;
        let bytes = &pickle[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint<const N: usize>(&mut self) -> Result<u64> {
        let mut buf = [0u8; 8];
        buf[..N].copy_from_slice(self.take(N)?);
        Ok(u64::from_le_bytes(buf))
    }

    /// A length operand, which must fit in what is left of the pickle.
    fn len_operand<const N: usize>(&mut self) -> Result<usize> {
        let len = self.uint::<N>()?;
        usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.pickle.len() - self.pos)
            .ok_or_else(|| anyhow!("a length of {len} at byte {} runs past the end of the pickle", self.pos))
    }

    /// A protocol 0 text operand, up to its newline.
    fn line(&mut self) -> Result<&'a str> {
        let pickle = self.pickle;
        let rest = &pickle[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| anyhow!("an unterminated text operand at byte {}", self.pos))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("a text operand at byte {} is not UTF-8", self.pos))
    }

    fn mark_on_top(&self) -> bool {
        self.marks.last() == Some(&self.stack.len())
    }

    fn pop(&mut self) -> Result<Slot> {
        if self.mark_on_top() {
            bail!("an opcode at byte {} pops a MARK as a value", self.pos);
        }
        self.stack.pop().ok_or_else(|| anyhow!("the pickle's stack underflows at byte {}", self.pos))
    }

    fn top(&self) -> Result<&Slot> {
        if self.mark_on_top() {
            bail!("an opcode at byte {} needs a value but finds a MARK", self.pos);
        }
        self.stack.last().ok_or_else(|| anyhow!("the pickle's stack underflows at byte {}", self.pos))
    }

    /// Pops everything above the innermost MARK, and the mark; returns their total size.
    fn pop_to_mark(&mut self) -> Result<Slot> {
        let mark = self.marks.pop().ok_or_else(|| anyhow!("an opcode at byte {} has no MARK", self.pos))?;
        if mark > self.stack.len() {
            bail!("the pickle's stack underflows past a MARK at byte {}", self.pos);
        }
        Ok(self.stack.drain(mark..).fold(Slot::default(), Slot::plus))
    }

    /// Pops `n` values and pushes one object built from them.
    fn combine(&mut self, n: usize) -> Result<()> {
        let mut built = Slot::scalar();
        for _ in 0..n {
            built = built.plus(self.pop()?);
        }
        self.stack.push(built);
        Ok(())
    }

    /// Adds the values above the innermost MARK (or `n` values) into the container below them.
    fn extend(&mut self, to_mark: bool, n: usize) -> Result<()> {
        let items = if to_mark {
            self.pop_to_mark()?
        } else {
            let mut sum = Slot::default();
            for _ in 0..n {
                sum = sum.plus(self.pop()?);
            }
            sum
        };
        if self.mark_on_top() || self.stack.is_empty() {
            bail!("an opcode at byte {} adds items to a missing container", self.pos);
        }
        if let Some(top) = self.stack.last_mut() {
            *top = std::mem::take(top).plus(items);
        }
        Ok(())
    }

    /// Charges a copy of `slot` (the reader deep-copies memo entries) against the budget.
    fn charge(&mut self, slot: &Slot) -> Result<()> {
        self.copied = self.copied.saturating_add(slot.nodes).saturating_add(slot.bytes);
        if self.copied > self.copy_budget {
            bail!(
                "its memo copies would build more than {} objects and bytes from a {}-byte pickle (a memo bomb)",
                self.copy_budget,
                self.pickle.len()
            );
        }
        Ok(())
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let slot = self.top()?.clone();
        self.charge(&slot)?;
        self.memo.insert(index, slot);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let slot = self
            .memo
            .get(&index)
            .cloned()
            .ok_or_else(|| anyhow!("memo entry {index} fetched at byte {} was never stored", self.pos))?;
        self.charge(&slot)?;
        self.stack.push(slot);
        Ok(())
    }

    fn push_text(&mut self, len: usize) -> Result<()> {
        let at = self.pos;
        let text = std::str::from_utf8(self.take(len)?).map_err(|_| anyhow!("the string at byte {at} is not UTF-8"))?;
        let slot = Slot { text: Some(Rc::from(text)), nodes: 1, bytes: len as u64 };
        self.stack.push(slot);
        Ok(())
    }

    /// A Python 2 `str`: text when it is UTF-8 (as the reader keeps it), bytes otherwise.
    fn push_py2_string(&mut self, len: usize) -> Result<()> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).ok().map(Rc::from);
        self.stack.push(Slot { text, nodes: 1, bytes: len as u64 });
        Ok(())
    }

    fn push_bytes(&mut self, len: usize) -> Result<()> {
        self.take(len)?;
        self.stack.push(Slot::other(1, len as u64));
        Ok(())
    }

    fn check_global(&self, module: &str, name: &str, opcode: &str, at: usize) -> Result<()> {
        if allowed_global(module, name) {
            return Ok(());
        }
        bail!(
            "refused: its pickle names the Python global `{module}.{name}` ({opcode} at byte {at}), which a \
             state dict never needs; kiln allows only collections.OrderedDict, torch._utils._rebuild_tensor_v2/\
             _v3/_rebuild_parameter, torch's storage classes and dtypes (nothing in the file was executed)"
        )
    }

    fn run(mut self) -> Result<()> {
        loop {
            let at = self.pos;
            let byte = self
                .u8()
                .map_err(|_| anyhow!("the pickle ends at byte {at} without a STOP opcode (it is truncated)"))?;
            // INST and OBJ call a class in protocols 0 and 1. The reader implements neither, but
            // INST names its class inline, and that is the clearer message.
            if byte == b'i' {
                let module = self.line()?.to_owned();
                let name = self.line()?.to_owned();
                self.check_global(&module, &name, "INST", at)?;
                bail!("unsupported pickle opcode INST at byte {at}");
            }
            let op = OpCode::try_from(byte).map_err(|b| anyhow!("invalid pickle opcode 0x{b:02x} at byte {at}"))?;
            match op {
                OpCode::Proto => {
                    let version = self.u8()?;
                    if version > 5 {
                        bail!("unsupported pickle protocol {version}");
                    }
                }
                OpCode::Frame => {
                    self.take(8)?;
                }
                OpCode::Stop => return Ok(()),

                OpCode::None | OpCode::NewTrue | OpCode::NewFalse => self.stack.push(Slot::scalar()),
                // Protocol 0 text scalars; a `UNICODE` string is not taken as a STACK_GLOBAL
                // operand (no torch pickle mixes protocol 0 strings with protocol 4 opcodes).
                OpCode::Int | OpCode::Long | OpCode::Float | OpCode::Unicode => {
                    let len = self.line()?.len() as u64;
                    self.stack.push(Slot::other(1, len));
                }
                OpCode::BinInt => {
                    self.take(4)?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::BinInt1 => {
                    self.take(1)?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::BinInt2 => {
                    self.take(2)?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::BinFloat => {
                    self.take(8)?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::Long1 => {
                    let len = self.len_operand::<1>()?;
                    self.take(len)?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::Long4 => {
                    let len = self.len_operand::<4>()?;
                    self.take(len)?;
                    self.stack.push(Slot::scalar());
                }

                OpCode::ShortBinUnicode => {
                    let len = self.len_operand::<1>()?;
                    self.push_text(len)?;
                }
                OpCode::BinUnicode => {
                    let len = self.len_operand::<4>()?;
                    self.push_text(len)?;
                }
                OpCode::BinUnicode8 => {
                    let len = self.len_operand::<8>()?;
                    self.push_text(len)?;
                }
                OpCode::ShortBinString => {
                    let len = self.len_operand::<1>()?;
                    self.push_py2_string(len)?;
                }
                OpCode::BinString => {
                    let len = self.len_operand::<4>()?;
                    self.push_py2_string(len)?;
                }
                OpCode::ShortBinBytes => {
                    let len = self.len_operand::<1>()?;
                    self.push_bytes(len)?;
                }
                OpCode::BinBytes => {
                    let len = self.len_operand::<4>()?;
                    self.push_bytes(len)?;
                }
                OpCode::BinBytes8 | OpCode::ByteArray8 => {
                    let len = self.len_operand::<8>()?;
                    self.push_bytes(len)?;
                }

                OpCode::Mark => self.marks.push(self.stack.len()),
                OpCode::EmptyTuple | OpCode::EmptyList | OpCode::EmptySet | OpCode::EmptyDict => {
                    self.stack.push(Slot::scalar())
                }
                OpCode::Tuple | OpCode::List | OpCode::FrozenSet | OpCode::Dict => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Slot::scalar().plus(items));
                }
                OpCode::Tuple1 => self.combine(1)?,
                OpCode::Tuple2 => self.combine(2)?,
                OpCode::Tuple3 => self.combine(3)?,
                OpCode::Append => self.extend(false, 1)?,
                OpCode::SetItem => self.extend(false, 2)?,
                OpCode::Appends | OpCode::AddItems | OpCode::SetItems => self.extend(true, 0)?,

                OpCode::Pop => {
                    if self.mark_on_top() {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                OpCode::PopMark => {
                    self.pop_to_mark()?;
                }
                OpCode::Dup => {
                    let slot = self.top()?.clone();
                    self.charge(&slot)?;
                    self.stack.push(slot);
                }

                OpCode::Get => {
                    let index = parse_index(self.line()?)?;
                    self.memo_get(index)?;
                }
                OpCode::BinGet => {
                    let index = self.uint::<1>()? as u32;
                    self.memo_get(index)?;
                }
                OpCode::LongBinGet => {
                    let index = self.uint::<4>()? as u32;
                    self.memo_get(index)?;
                }
                OpCode::Put => {
                    let index = parse_index(self.line()?)?;
                    self.memo_put(index)?;
                }
                OpCode::BinPut => {
                    let index = self.uint::<1>()? as u32;
                    self.memo_put(index)?;
                }
                OpCode::LongBinPut => {
                    let index = self.uint::<4>()? as u32;
                    self.memo_put(index)?;
                }
                OpCode::Memoize => {
                    let index = self.memo.len() as u32;
                    self.memo_put(index)?;
                }

                OpCode::Global => {
                    let module = self.line()?.to_owned();
                    let name = self.line()?.to_owned();
                    self.check_global(&module, &name, "GLOBAL", at)?;
                    self.stack.push(Slot::other(1, (module.len() + name.len()) as u64));
                }
                OpCode::StackGlobal => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(module), Some(name)) = (module.text, name.text) else {
                        bail!(
                            "refused: STACK_GLOBAL at byte {at} takes its module and name from values that \
                             are not string literals, so the global it names cannot be verified"
                        );
                    };
                    self.check_global(&module, &name, "STACK_GLOBAL", at)?;
                    self.stack.push(Slot::other(1, (module.len() + name.len()) as u64));
                }
                OpCode::PersId => {
                    self.line()?;
                    self.stack.push(Slot::scalar());
                }
                OpCode::BinPersId => self.combine(1)?,
                // Calls and object builds: the result is bounded by what went into it.
                OpCode::Reduce | OpCode::NewObj => self.combine(2)?,
                OpCode::NewObjEx => self.combine(3)?,
                OpCode::Build => {
                    self.combine(2)?;
                    // The reader refreshes a memoized object's copy after BUILD.
                    let built = self.top()?.clone();
                    self.charge(&built)?;
                }
                // The extension registry names globals by number, which cannot be checked.
                OpCode::Ext1 | OpCode::Ext2 | OpCode::Ext4 => {
                    bail!("refused: extension opcode {op:?} at byte {at} names a global that cannot be verified")
                }
                other => bail!("unsupported pickle opcode {other:?} at byte {at}"),
            }
        }
    }
}

fn parse_index(text: &str) -> Result<u32> {
    text.parse::<u32>().map_err(|_| anyhow!("`{text}` is not a memo index"))
}

/// Checks the zip container and every `data.pkl` in it (see the module docs), before the
/// reader opens the file.
fn prescan(path: &Path) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut magic = Vec::with_capacity(4);
    (&mut file).take(4).read_to_end(&mut magic).with_context(|| format!("cannot read {}", path.display()))?;
    // The reader picks the container from these bytes, so only a file that starts like a zip
    // reaches it: the other containers' pickles are not scanned here.
    if magic != b"PK\x03\x04" && magic != b"PK\x05\x06" {
        bail!(
            "{}: not a PyTorch zip checkpoint (the format torch.save writes since PyTorch 1.6); the older \
             pickle-stream and TAR formats are not read: load it in Python and save it again",
            path.display()
        );
    }
    let corrupt = |e: zip::result::ZipError| anyhow!("{}: not a readable zip archive: {e}", path.display());
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = ZipArchive::new(BufReader::new(file)).map_err(corrupt)?;
    if archive.has_duplicate_names() {
        bail!("{}: the zip archive lists an entry name twice", path.display());
    }
    let mut pickles = 0;
    for index in 0..archive.len() {
        let (name, crc32, method) = {
            let entry = archive.by_index_raw(index).map_err(corrupt)?;
            (entry.name().map_err(corrupt)?.into_owned(), entry.crc32(), entry.compression())
        };
        if method != CompressionMethod::Stored {
            bail!(
                "{}: zip entry `{name}` is compressed ({method:?}); torch.save stores entries uncompressed and \
                 kiln reads only those",
                path.display()
            );
        }
        if !name.ends_with("data.pkl") {
            continue;
        }
        // As the reader does: a CRC of 0 means torch.save was told not to compute one.
        let options = ZipReadOptions::new().ignore_crc32(crc32 == 0);
        let entry = archive.by_index_with_options(index, options).map_err(corrupt)?;
        let declared = entry.size();
        if declared > file_len {
            bail!("{}: zip entry `{name}` claims {declared} bytes, more than the whole file", path.display());
        }
        let mut pickle = Vec::with_capacity(declared as usize);
        // One byte past the declared size, so the read reaches the entry's end (where its
        // checksum is verified) and an entry holding more than it declares is caught.
        entry
            .take(declared + 1)
            .read_to_end(&mut pickle)
            .with_context(|| format!("{}: cannot read zip entry `{name}`", path.display()))?;
        if pickle.len() as u64 != declared {
            bail!(
                "{}: zip entry `{name}` holds {} bytes but declares {declared}",
                path.display(),
                pickle.len()
            );
        }
        scan_pickle(&pickle).map_err(|e| anyhow!("{}: {name}: {e}", path.display()))?;
        pickles += 1;
    }
    if pickles == 0 {
        bail!("{}: a zip archive without a data.pkl entry, so not a PyTorch checkpoint", path.display());
    }
    Ok(())
}

/// The safetensors dtype of a PyTorch element type.
fn dtype_of(dtype: DType) -> Dtype {
    match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U64 => Dtype::U64,
        DType::U32 => Dtype::U32,
        DType::U16 => Dtype::U16,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

/// One PyTorch checkpoint: its tensors' names, dtypes and shapes, read on request.
pub struct TorchFile {
    path: PathBuf,
    /// By name; each reads its bytes from the (still open) file when asked.
    tensors: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl TorchFile {
    /// Scans and parses `path`; fails, naming the file, on anything but a plain state dict.
    pub fn open(path: &Path) -> Result<Self> {
        prescan(path)?;
        let reader = PytorchReader::new(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if reader.metadata().format_type != FileFormat::Zip {
            bail!("{}: not read as a zip checkpoint", path.display());
        }
        let file_len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
        let mut tensors = BTreeMap::new();
        for (name, tensor) in reader.into_tensors() {
            if tensor.byte_len() as u64 > file_len {
                bail!(
                    "{}: tensor `{name}` of shape {:?} would take {} bytes, more than the {file_len}-byte file \
                     holds (an expanded view); kiln does not materialize those",
                    path.display(),
                    tensor.shape(),
                    tensor.byte_len()
                );
            }
            tensors.insert(name, tensor);
        }
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Name, dtype and shape of every tensor, in name order.
    pub fn tensors(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        self.tensors.iter().map(|(name, t)| (name.clone(), dtype_of(t.dtype()), t.shape().to_vec())).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// One tensor's dtype and shape.
    pub fn info(&self, name: &str) -> Result<(Dtype, Vec<usize>)> {
        let t = self.tensor(name)?;
        Ok((dtype_of(t.dtype()), t.shape().to_vec()))
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))
    }

    /// One tensor's bytes: little-endian, contiguous, row-major (a strided view gathered), as
    /// `tensor.contiguous()` holds them in torch. A storage that is missing, shorter than the
    /// pickle says, or fails its checksum is an error naming the file and tensor.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.tensor(name)?;
        let mut bytes = t.read().map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
        if bytes.len() != t.byte_len() {
            bail!("{}: tensor `{name}` read {} bytes, expected {}", self.path.display(), bytes.len(), t.byte_len());
        }
        // The reader hands back native-endian bytes.
        if cfg!(target_endian = "big") {
            for element in bytes.chunks_exact_mut(t.dtype().size()) {
                element.reverse();
            }
        }
        Ok(bytes)
    }

    /// One tensor as f32 values (from F32, F16 or BF16), in the stored row-major layout.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let dtype = self.tensor(name)?.dtype();
        let bytes = self.read_bytes(name)?;
        Ok(match dtype {
            DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => bail!(
                "{}: tensor `{name}` has dtype {:?}; kiln reads F32, F16 and BF16",
                self.path.display(),
                dtype_of(other)
            ),
        })
    }

    /// One tensor's values, which must have shape `expected`.
    fn read_f32_shaped(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let shape = self.tensor(name)?.shape();
        if shape != expected {
            bail!("{}: tensor `{name}` has shape {shape:?}, expected {expected:?}", self.path.display());
        }
        self.read_f32(name)
    }
}

/// Tensors by their Hugging Face names, as stored.
impl crate::params::ParamSource for &TorchFile {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self.read_f32_shaped(name, hf_shape).map_err(|e| format!("{e:#}"))
    }
}

/// Where a stored tensor of a [`TorchWeights`] is: the index of its file, its dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

/// A directory's PyTorch weights: `pytorch_model.bin`, or the shards that
/// `pytorch_model.bin.index.json` names (the index wins when both exist, as with safetensors).
#[derive(Debug)]
pub struct TorchWeights {
    files: Vec<TorchFile>,
    names: BTreeMap<String, StoredTensor>,
}

impl TorchWeights {
    /// Opens the directory's PyTorch weights; `None` when it has neither file. Shard names must
    /// stay inside the directory, every tensor the index lists must be in its shard, and a
    /// tensor stored in two files is an error.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let Some(located) = weight_files(dir, TORCH_WEIGHTS_FILE, TORCH_INDEX_FILE)? else {
            return Ok(None);
        };
        let mut files = Vec::new();
        let mut names = BTreeMap::new();
        for name in &located.files {
            let file = TorchFile::open(&dir.join(name))?;
            for (tensor, dtype, shape) in file.tensors() {
                if names.contains_key(&tensor) {
                    bail!("{}: tensor `{tensor}` is stored twice", dir.display());
                }
                names.insert(tensor, StoredTensor { file: files.len(), dtype, shape });
            }
            files.push(file);
        }
        if let Some(index) = &located.index {
            index.check(|tensor| names.get(tensor).map(|t: &StoredTensor| located.files[t.file].as_str()))?;
        }
        Ok(Some(Self { files, names }))
    }

    /// Every stored tensor: name -> file index, dtype, shape; in name order.
    pub fn names(&self) -> &BTreeMap<String, StoredTensor> {
        &self.names
    }

    /// The weight files, in file-name order ([`StoredTensor::file`] indexes this).
    pub fn files(&self) -> &[TorchFile] {
        &self.files
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&TorchFile> {
        self.names.get(name).map(|t| &self.files[t.file])
    }

    fn file_for(&self, name: &str) -> Result<&TorchFile> {
        let Some(file) = self.file_of(name) else {
            let first = self.files.first().map(|f| f.path().display().to_string()).unwrap_or_default();
            bail!("tensor `{name}` is in none of the PyTorch weight files ({first}, ...)");
        };
        Ok(file)
    }

    /// One tensor's little-endian contiguous bytes.
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        self.file_for(name)?.read_bytes(name)
    }

    /// One tensor as f32 values (from F32, F16 or BF16) in the stored (Hugging Face) layout.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        self.file_for(name)?.read_f32(name)
    }
}

/// Tensors by their Hugging Face names, as stored; shapes are checked.
impl crate::params::ParamSource for &TorchWeights {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self.file_for(name).and_then(|f| f.read_f32_shaped(name, hf_shape)).map_err(|e| format!("{e:#}"))
    }
}
