//! PyTorch checkpoints: `kiln::pytorch` (read without running the pickle) and `kiln convert`,
//! checked against torch and safetensors themselves (tests/python/torch_bin.py; they fail,
//! rather than skip, without `pip install torch safetensors`), and a mutation fuzz test of both
//! weight readers that needs no Python.
//!
//! The fuzz tests (`mutated_*`) run 1,000 cases per target by default, a few seconds in
//! release. `PROPTEST_CASES` sets the count per target; a longer run:
//!
//! ```text
//! PROPTEST_CASES=100000 cargo test --release --locked --features wgpu --test kiln pytorch::mutated
//! ```
//!
//! A case that panics fails with the smallest mutation list proptest finds. The fuzz tests also
//! install a global allocator that, on the fuzzing thread only, records the peak and largest
//! allocation while a mutated file is read; a case over its bound (tied to the file's size)
//! fails, and an allocation over 1 GiB is refused (aborting the binary) with a message pointing
//! at the case's file under `CARGO_TARGET_TMPDIR`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::params::ParamSource;
use kiln::pytorch::{TorchFile, TorchWeights, scan_pickle};
use kiln::safetensors_io::{PendingTensor, SafetensorsFile, write_to};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use safetensors::Dtype;
use serde_json::Value;

use super::common::repo_path;

const PIP_HINT: &str = "tests/python/torch_bin.py needs python3 with torch and safetensors: `bash scripts/test.sh` installs them into .venv";

/// Runs tests/python/torch_bin.py; its JSON output on success, a failed test otherwise.
fn python(args: &[&str]) -> Value {
    let output = Command::new("python3")
        .arg(repo_path("tests/python/torch_bin.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}); {PIP_HINT}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "torch_bin.py {args:?} failed ({PIP_HINT}):\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("torch_bin.py printed {stdout:?}: {e}"))
}

fn kiln(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn convert(input: &Path, output: &Path) -> Output {
    kiln(&[Path::new("convert"), input, output])
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// torch_bin.py's fixtures in a fresh directory.
fn fixtures() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    python(&["make-fixtures", dir.path().to_str().unwrap()]);
    dir
}

/// The names of a directory's entries, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Checks `torch` against the files torch_bin.py wrote next to it: every tensor's name, dtype,
/// shape and bytes against `save_file`'s, and every float tensor's f32 values against torch's
/// own `.float()`.
fn assert_matches_references(torch: &TorchFile, reference: &Path, floats: &Path) {
    let reference = SafetensorsFile::open(reference).unwrap();
    let floats = SafetensorsFile::open(floats).unwrap();
    let expected: Vec<_> = reference.tensors().into_iter().map(|(name, dtype, shape, _)| (name, dtype, shape)).collect();
    assert_eq!(torch.tensors(), expected, "{}", torch.path().display());
    for (name, dtype, _) in torch.tensors() {
        let (_, bytes) = reference.read_raw(&name).unwrap();
        assert_eq!(torch.read_bytes(&name).unwrap(), bytes, "{name}");
        match dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
                let (values, _) = floats.read_f32(&name, None).unwrap();
                assert_eq!(bits(&torch.read_f32(&name).unwrap()), bits(&values), "{name}");
            }
            _ => {
                let err = torch.read_f32(&name).unwrap_err().to_string();
                assert!(err.contains("kiln reads F32, F16 and BF16") && err.contains(&name), "{err}");
            }
        }
    }
}

#[test]
fn torch_file_reads_what_torch_saved() {
    let dir = fixtures();
    for stem in ["plain", "views", "module"] {
        let torch = TorchFile::open(&dir.path().join(format!("{stem}.bin"))).unwrap();
        assert!(!torch.tensors().is_empty());
        assert_matches_references(
            &torch,
            &dir.path().join(format!("{stem}.reference.safetensors")),
            &dir.path().join(format!("{stem}.f32.safetensors")),
        );
    }
    // The transposed view and the row come out gathered from the shared storage.
    let views = TorchFile::open(&dir.path().join("views.bin")).unwrap();
    let base = views.read_f32("base").unwrap();
    let transposed = views.read_f32("transposed").unwrap();
    assert_eq!(views.info("transposed").unwrap().1, vec![6, 4]);
    for r in 0..4 {
        for c in 0..6 {
            assert_eq!(transposed[c * 4 + r].to_bits(), base[r * 6 + c].to_bits());
        }
    }
    assert_eq!(bits(&views.read_f32("row").unwrap()), bits(&base[12..18]));
    assert_eq!(views.read_f32("expanded").unwrap(), vec![0.0, 1.0, 2.0, 0.0, 1.0, 2.0]);
    let err = views.read_bytes("nope").unwrap_err().to_string();
    assert!(err.contains("views.bin") && err.contains("`nope` is missing"), "{err}");
}

#[test]
fn torch_weights_open_single_and_sharded_directories() {
    let dir = fixtures();
    let reference = SafetensorsFile::open(&dir.path().join("plain.reference.safetensors")).unwrap();
    let floats = SafetensorsFile::open(&dir.path().join("plain.f32.safetensors")).unwrap();
    let expected: BTreeMap<String, (Dtype, Vec<usize>)> =
        reference.tensors().into_iter().map(|(name, dtype, shape, _)| (name, (dtype, shape))).collect();
    for (sub, files) in [("single", 1), ("sharded", 2)] {
        let weights = TorchWeights::open(&dir.path().join(sub)).unwrap().expect(sub);
        assert_eq!(weights.files().len(), files, "{sub}");
        let found: BTreeMap<String, (Dtype, Vec<usize>)> =
            weights.names().iter().map(|(name, t)| (name.clone(), (t.dtype, t.shape.clone()))).collect();
        assert_eq!(found, expected, "{sub}");
        for (name, stored) in weights.names() {
            assert_eq!(weights.read_bytes(name).unwrap(), reference.read_raw(name).unwrap().1, "{sub} {name}");
            assert!(std::ptr::eq(weights.file_of(name).unwrap(), &weights.files()[stored.file]));
            if let (Dtype::F32 | Dtype::F16 | Dtype::BF16, Ok((values, shape))) = (stored.dtype, floats.read_f32(name, None)) {
                assert_eq!(bits(&weights.read_f32(name).unwrap()), bits(&values), "{sub} {name}");
                let mut source = &weights;
                assert_eq!(bits(&source.values(name, &shape).unwrap()), bits(&values), "{sub} {name}");
                let err = source.values(name, &[7, 7]).unwrap_err();
                assert!(err.contains("expected [7, 7]"), "{err}");
            }
        }
    }
    // The index names the shard of each tensor.
    let sharded = TorchWeights::open(&dir.path().join("sharded")).unwrap().unwrap();
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("sharded/pytorch_model.bin.index.json")).unwrap(),
    )
    .unwrap();
    for (name, shard) in index["weight_map"].as_object().unwrap() {
        assert!(sharded.file_of(name).unwrap().path().ends_with(shard.as_str().unwrap()), "{name}");
    }

    // A directory with neither file is not an error, just not a PyTorch directory.
    let empty = tempfile::tempdir().unwrap();
    assert!(TorchWeights::open(empty.path()).unwrap().is_none());

    // Broken indexes.
    let plain = dir.path().join("plain.bin");
    let bad = |weight_map: Value, shards: &[&str]| -> String {
        let d = tempfile::tempdir().unwrap();
        for shard in shards {
            std::fs::copy(&plain, d.path().join(shard)).unwrap();
        }
        let index = serde_json::json!({ "weight_map": weight_map });
        std::fs::write(d.path().join("pytorch_model.bin.index.json"), index.to_string()).unwrap();
        format!("{:#}", TorchWeights::open(d.path()).unwrap_err())
    };
    let err = bad(serde_json::json!({"step": "../plain.bin"}), &[]);
    assert!(err.contains("points outside the directory"), "{err}");
    let err = bad(serde_json::json!({"step": ".hidden.bin"}), &[]);
    assert!(err.contains("points outside the directory"), "{err}");
    let err = bad(serde_json::json!({"step": "a.bin", "ids": "b.bin"}), &["a.bin", "b.bin"]);
    assert!(err.contains("is stored twice"), "{err}");
    let err = bad(serde_json::json!({"step": "a.bin", "ghost": "a.bin"}), &["a.bin"]);
    assert!(err.contains("`ghost`") && err.contains("does not hold it"), "{err}");
    let err = bad(serde_json::json!({"step": 3}), &["a.bin"]);
    assert!(err.contains("must be file names"), "{err}");
}

#[test]
fn convert_writes_what_safetensors_torch_writes() {
    let dir = fixtures();
    let d = dir.path();
    // The fuzz tests' seed, written by Rust: torch must load it too.
    std::fs::write(d.join("seed.bin"), torch_seed(true)).unwrap();
    std::fs::copy(d.join("plain.bin"), d.join("plain.pt")).unwrap();
    std::fs::copy(d.join("views.bin"), d.join("views.pth")).unwrap();
    let mut pairs = Vec::new();
    for input in ["plain.bin", "views.bin", "module.bin", "seed.bin", "plain.pt", "views.pth"] {
        let output = d.join(format!("{input}.safetensors"));
        let run = convert(&d.join(input), &output);
        assert!(run.status.success(), "kiln convert {input}: {}", stderr(&run));
        assert!(stderr(&run).contains("converted"), "{}", stderr(&run));
        let file = SafetensorsFile::open(&output).unwrap();
        assert_eq!(file.metadata(), BTreeMap::from([("format".to_string(), "pt".to_string())]));
        pairs.push(d.join(input).display().to_string());
        pairs.push(output.display().to_string());
    }
    let args: Vec<&str> = std::iter::once("check-convert").chain(pairs.iter().map(String::as_str)).collect();
    let checked = python(&args);
    let checked = checked.as_array().unwrap();
    assert_eq!(checked.len(), 6);
    for c in checked {
        assert!(c["tensors"].as_u64().unwrap() > 0, "{c}");
    }
    // Contiguous, unshared tensors: the reference is save_file itself. (The files are not
    // byte-identical: save_file orders the data by dtype, then name; kiln's writer by name.)
    assert_eq!(checked[0]["reference"], "save_file", "{}", checked[0]);
    eprintln!("check-convert: {checked:?}");

    // Never overwrite.
    let existing = d.join("plain.bin.safetensors");
    let before = std::fs::read(&existing).unwrap();
    let run = convert(&d.join("views.bin"), &existing);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("already exists") && stderr(&run).contains("plain.bin.safetensors"), "{}", stderr(&run));
    assert_eq!(std::fs::read(&existing).unwrap(), before);

    // Unsupported extension pairs say what is supported.
    for (input, output) in [("plain.reference.safetensors", "x.bin"), ("plain.bin", "x.txt"), ("plain.bin", "x")] {
        let run = convert(&d.join(input), &d.join(output));
        assert!(!run.status.success(), "{input} -> {output}");
        let err = stderr(&run);
        assert!(err.contains("supported: a PyTorch file (.bin, .pt or .pth) or a .gguf to .safetensors, and any of these or a .safetensors to .json"), "{err}");
        assert!(!d.join(output).exists());
    }
}

#[test]
fn hostile_pickles_are_refused_and_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("MARKER");
    let hostile = dir.path().join("hostile");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // --prove: Python's own unpickler runs each of these (with another marker) first.
    let cases = python(&["make-hostile", hostile.to_str().unwrap(), marker.to_str().unwrap(), "--prove"]);
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 8);
    for (name, case) in cases {
        let path = PathBuf::from(case["path"].as_str().unwrap());
        let expect = case["expect"].as_str().unwrap();
        let err = format!("{:#}", TorchFile::open(&path).unwrap_err());
        assert!(err.contains(expect) && err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(err.contains("refused"), "{name}: {err}");

        let target = out.join(format!("{name}.safetensors"));
        let run = convert(&path, &target);
        assert!(!run.status.success(), "{name}");
        let err = stderr(&run);
        assert!(err.contains(expect) && err.contains(&path.display().to_string()), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");

        // As a model directory's weights.
        let model = dir.path().join(format!("model-{name}"));
        std::fs::create_dir(&model).unwrap();
        std::fs::copy(&path, model.join("pytorch_model.bin")).unwrap();
        let err = format!("{:#}", TorchWeights::open(&model).unwrap_err());
        assert!(err.contains(expect), "{name}: {err}");
    }
    assert!(listing(&out).is_empty(), "{:?}", listing(&out));
    assert!(!marker.exists(), "a hostile pickle ran: {} exists", marker.display());
}

#[test]
fn scan_refuses_what_a_state_dict_never_needs() {
    // GLOBAL, and STACK_GLOBAL with strings fetched back from the memo after a decoy.
    let global = b"\x80\x02cposix\nsystem\n)R.";
    let memo = b"\x80\x04\x8c\x0asubprocess\x94\x8c\x05Popen\x94\x8c\x0bcollections00\x30h\x00h\x01\x93)R.";
    for (pickle, expect) in [(&global[..], "`posix.system`"), (&memo[..], "`subprocess.Popen`")] {
        let err = scan_pickle(pickle).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains("refused"), "{err}");
    }
    // A global read with its trailing `\r`, which the reader would strip, is not the allowed one.
    assert!(scan_pickle(b"\x80\x02ccollections\r\nOrderedDict\n)R.").is_err());
    // What torch writes passes.
    assert!(scan_pickle(&seed_pickle()).is_ok());
    // A STACK_GLOBAL taking its operands from anything but string literals.
    let err = scan_pickle(b"\x80\x04K\x01K\x02\x93.").unwrap_err().to_string();
    assert!(err.contains("cannot be verified"), "{err}");
    // A memo bomb: a 200-item tuple fetched 4,000 times is ~800k objects for a reader that
    // copies memo entries, from an 8 kB pickle.
    let mut bomb = b"\x80\x02(".to_vec();
    bomb.extend(std::iter::repeat_n(b')', 200));
    bomb.extend(b"tq\x00");
    for _ in 0..4000 {
        bomb.extend(b"h\x00");
    }
    bomb.push(b'.');
    let err = scan_pickle(&bomb).unwrap_err().to_string();
    assert!(err.contains("memo bomb"), "{err}");
    // Truncated and invalid pickles.
    assert!(scan_pickle(&seed_pickle()[..40]).unwrap_err().to_string().contains("truncated"));
    assert!(scan_pickle(b"\x80\x02\xff.").unwrap_err().to_string().contains("invalid pickle opcode 0xff"));
    assert!(scan_pickle(b"\x80\x02X\xff\xff\xff\x7f.").unwrap_err().to_string().contains("past the end"));
}

#[test]
fn damaged_files_fail_cleanly_naming_the_file() {
    let dir = fixtures();
    let d = dir.path();
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let plain = std::fs::read(d.join("plain.bin")).unwrap();
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();
    for (i, len) in [0, 10, plain.len() / 4, plain.len() / 2, plain.len() - 22, plain.len() - 1].into_iter().enumerate() {
        let path = d.join(format!("truncated{i}.bin"));
        std::fs::write(&path, &plain[..len]).unwrap();
        cases.push((path, ""));
    }
    cases.push((d.join("corrupt_storage.bin"), "checksum"));
    cases.push((d.join("legacy.bin"), "not a PyTorch zip checkpoint"));
    std::fs::copy(d.join("plain.reference.safetensors"), d.join("safetensors.bin")).unwrap();
    cases.push((d.join("safetensors.bin"), "not a PyTorch zip checkpoint"));
    for (path, expect) in &cases {
        let name = path.display().to_string();
        // Opening, or else reading some tensor, fails with the file's name.
        let err = match TorchFile::open(path) {
            Err(e) => format!("{e:#}"),
            Ok(torch) => {
                let failures: Vec<String> = torch
                    .tensors()
                    .iter()
                    .filter_map(|(t, ..)| torch.read_bytes(t).err().map(|e| format!("{e:#}")))
                    .collect();
                assert!(!failures.is_empty(), "{name} reads without error");
                failures.join("; ")
            }
        };
        assert!(err.contains(&name) && err.contains(expect), "{name}: {err}");

        let target = out.join("converted.safetensors");
        let run = convert(path, &target);
        assert!(!run.status.success(), "{name}");
        let err = stderr(&run);
        assert!(err.contains(&name) && err.contains(expect) && !err.contains("panicked"), "{name}: {err}");
        // Nothing under OUT's name, and no temporary file left behind.
        assert!(listing(&out).is_empty(), "{name}: {:?}", listing(&out));
    }
}

// --- mutation fuzzing ---------------------------------------------------------------------------

/// A pickle like the one `torch.save` writes for a small state dict: an f32 [2, 3], its
/// transpose sharing the storage, an f16 [3] and a bf16 [2] at a storage offset, with the
/// memo use torch makes (BINPUT, BINGET).
fn seed_pickle() -> Vec<u8> {
    fn text(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }
    fn tuple(p: &mut Vec<u8>, items: &[u8]) {
        p.push(b'(');
        for &i in items {
            p.extend([b'K', i]);
        }
        p.push(b't');
    }
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    let tensors: [(&str, &str, &str, u8, u8, &[u8], &[u8]); 4] = [
        ("w", "FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]),
        ("wt", "FloatStorage", "0", 6, 0, &[3, 2], &[1, 3]),
        ("h", "HalfStorage", "1", 3, 0, &[3], &[1]),
        ("b", "BFloat16Storage", "2", 3, 1, &[2], &[1]),
    ];
    for (i, (name, class, key, numel, offset, shape, stride)) in tensors.into_iter().enumerate() {
        text(&mut p, name);
        if i == 0 {
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x02");
        } else {
            p.extend(b"h\x02");
        }
        p.extend(b"((");
        text(&mut p, "storage");
        p.extend(format!("ctorch\n{class}\n").as_bytes());
        text(&mut p, key);
        text(&mut p, "cpu");
        p.extend([b'K', numel, b't', b'Q', b'K', offset]);
        tuple(&mut p, shape);
        tuple(&mut p, stride);
        p.extend(b"\x89h\x00)Rt"); // requires_grad=False, OrderedDict() hooks
        p.push(b'R');
    }
    p.extend(b"u.");
    p
}

/// The storages of [`seed_pickle`]: f32 0..6, f16 [1, 2, 3], bf16 [0.5, -1, 4].
fn seed_storages() -> Vec<(&'static str, Vec<u8>)> {
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let f16s: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
    let bf16s: Vec<u8> = [0.5f32, -1.0, 4.0].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    vec![("0", f32s), ("1", f16s), ("2", bf16s)]
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A stored zip holding `entries`, as torch.save lays one out. Without `checksums`, every
/// CRC is 0, as `torch.save(..., compute_crc32=False)` writes (and readers then skip the check),
/// so a mutation inside an entry reaches its parser instead of failing the checksum.
fn stored_zip(entries: &[(String, Vec<u8>)], checksums: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let crc = if checksums { crc32(data) } else { 0 };
        let offset = out.len() as u32;
        let sizes = [crc, data.len() as u32, data.len() as u32];
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]); // version, flags, stored, time, date
        sizes.iter().for_each(|v| out.extend(v.to_le_bytes()));
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
        sizes.iter().for_each(|v| central.extend(v.to_le_bytes()));
        central.extend((name.len() as u16).to_le_bytes());
        central.extend([0u8; 12]); // extra, comment, disk, internal and external attributes
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let (count, cd_offset, cd_size) = (entries.len() as u16, out.len() as u32, central.len() as u32);
    out.extend(central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend(count.to_le_bytes());
    out.extend(count.to_le_bytes());
    out.extend(cd_size.to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// A torch checkpoint zip with the given pickle and the seed's storages.
fn torch_zip(pickle: Vec<u8>, checksums: bool) -> Vec<u8> {
    let mut entries = vec![
        ("seed/data.pkl".to_string(), pickle),
        ("seed/byteorder".to_string(), b"little".to_vec()),
    ];
    for (key, data) in seed_storages() {
        entries.push((format!("seed/data/{key}"), data));
    }
    entries.push(("seed/version".to_string(), b"3\n".to_vec()));
    stored_zip(&entries, checksums)
}

fn torch_seed(checksums: bool) -> Vec<u8> {
    torch_zip(seed_pickle(), checksums)
}

/// A small safetensors file from kiln's writer: F32, F16 and BF16 tensors and metadata.
fn safetensors_seed() -> Vec<u8> {
    let f16: Vec<u8> = (0..6).flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes()).collect();
    let bf16: Vec<u8> = (0..4).flat_map(|i| half::bf16::from_f32(i as f32 - 2.0).to_le_bytes()).collect();
    let tensors = vec![
        PendingTensor::from_f32("a.weight", vec![2, 3], (0..6).map(|i| i as f32 * 0.5).collect()),
        PendingTensor::from_bytes("b.half", Dtype::F16, vec![3, 2], f16),
        PendingTensor::from_bytes("c.bf16", Dtype::BF16, vec![4], bf16),
        PendingTensor::from_bytes("d.ids", Dtype::I64, vec![2], [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect()),
    ];
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut out = Vec::new();
    write_to(&mut out, &metadata, tensors).unwrap();
    out
}

/// Where the length and offset fields of a zip's headers are (offset, width in bytes).
fn zip_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut fields = Vec::new();
    for at in 0..bytes.len().saturating_sub(4) {
        let relative: &[(usize, usize)] = match &bytes[at..at + 4] {
            b"PK\x03\x04" => &[(14, 4), (18, 4), (22, 4), (26, 2), (28, 2)],
            b"PK\x01\x02" => &[(16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4)],
            b"PK\x05\x06" => &[(8, 2), (10, 2), (12, 4), (16, 4), (20, 2)],
            _ => &[],
        };
        fields.extend(relative.iter().map(|&(o, w)| (at + o, w)));
    }
    fields
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: Index, bit: u8 },
    Set { at: Index, byte: u8 },
    Truncate { at: Index },
    Insert { at: Index, bytes: Vec<u8> },
    Duplicate { from: Index, len: usize, at: Index },
    Remove { from: Index, len: usize },
    /// A 2, 4 or 8-byte little-endian value written anywhere.
    Huge { at: Index, width: usize, value: u64 },
    /// A value written over one of the seed's header length fields.
    Field { field: Index, value: u64 },
}

fn huge_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u16::MAX as u64),
        Just(u32::MAX as u64),
        Just(1 << 31),
        Just(1 << 40),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        0u64..100_000,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1usize..64, any::<Index>()).prop_map(|(from, len, at)| Mutation::Duplicate { from, len, at }),
        1 => (any::<Index>(), 1usize..64).prop_map(|(from, len)| Mutation::Remove { from, len }),
        2 => (any::<Index>(), prop_oneof![Just(2usize), Just(4), Just(8)], huge_value())
            .prop_map(|(at, width, value)| Mutation::Huge { at, width, value }),
        3 => (any::<Index>(), huge_value()).prop_map(|(field, value)| Mutation::Field { field, value }),
    ]
}

fn write_le(bytes: &mut [u8], at: usize, width: usize, value: u64) {
    let end = (at + width).min(bytes.len());
    let n = end - at;
    bytes[at..end].copy_from_slice(&value.to_le_bytes()[..n]);
}

fn mutate(mut bytes: Vec<u8>, fields: &[(usize, usize)], mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        match m {
            Mutation::Flip { at, bit } => bytes[at.index(len)] ^= 1 << bit,
            Mutation::Set { at, byte } => bytes[at.index(len)] = *byte,
            Mutation::Truncate { at } => bytes.truncate(at.index(len)),
            Mutation::Insert { at, bytes: new } => {
                let at = at.index(len + 1);
                bytes.splice(at..at, new.iter().copied());
            }
            Mutation::Duplicate { from, len: n, at } => {
                let from = from.index(len);
                let range = bytes[from..(from + n).min(len)].to_vec();
                let at = at.index(len + 1);
                bytes.splice(at..at, range);
            }
            Mutation::Remove { from, len: n } => {
                let from = from.index(len);
                bytes.drain(from..(from + n).min(len));
            }
            Mutation::Huge { at, width, value } => write_le(&mut bytes, at.index(len), *width, *value),
            Mutation::Field { field, value } => {
                let (at, width) = if fields.is_empty() { (0, 8) } else { fields[field.index(fields.len())] };
                if at < len {
                    write_le(&mut bytes, at, width, *value);
                }
            }
        }
    }
    bytes
}

/// On the thread that asks, the peak and the largest allocation made while a closure runs.
mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Over this, an allocation on a measured thread is refused (the binary then aborts), as a
    /// reader allocating it for a few-kB file is the bug the bound looks for.
    const REFUSE_OVER: usize = 1 << 30;
    const REFUSED: &str = concat!(
        "\npytorch fuzz: refused an allocation over 1 GiB while reading a mutated file; the input is the ",
        "newest of ",
        env!("CARGO_TARGET_TMPDIR"),
        "/pytorch-fuzz-*\n"
    );

    thread_local! {
        static ACTIVE: Cell<bool> = const { Cell::new(false) };
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    /// Accounts for `grow` more bytes in an allocation of `size`; false to refuse it.
    fn grow(size: usize, grow: usize) -> bool {
        if !ACTIVE.with(Cell::get) {
            return true;
        }
        if size > REFUSE_OVER {
            // SAFETY: writing a static string to stderr; nothing is allocated.
            unsafe { libc::write(2, REFUSED.as_ptr().cast(), REFUSED.len()) };
            return false;
        }
        LARGEST.with(|l| l.set(l.get().max(size)));
        LIVE.with(|l| {
            l.set(l.get() + grow as isize);
            PEAK.with(|p| p.set(p.get().max(l.get())));
        });
        true
    }

    fn shrink(by: usize) {
        if ACTIVE.with(Cell::get) {
            LIVE.with(|l| l.set(l.get() - by as isize));
        }
    }

    pub struct Measuring;

    // SAFETY: every call is passed on to the system allocator unchanged, or refused with null.
    unsafe impl GlobalAlloc for Measuring {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if !grow(layout.size(), layout.size()) {
                return std::ptr::null_mut();
            }
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if !grow(layout.size(), layout.size()) {
                return std::ptr::null_mut();
            }
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            shrink(layout.size());
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if new_size >= layout.size() {
                if !grow(new_size, new_size - layout.size()) {
                    return std::ptr::null_mut();
                }
            } else {
                shrink(layout.size() - new_size);
            }
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Measuring = Measuring;

    /// Runs `f`, returning what it returned, the peak bytes it held and its largest allocation.
    pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
        /// Stops measuring even when `f` panics (proptest catches it and goes on).
        struct Stop;
        impl Drop for Stop {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(false));
            }
        }
        LIVE.with(|l| l.set(0));
        PEAK.with(|p| p.set(0));
        LARGEST.with(|l| l.set(0));
        ACTIVE.with(|a| a.set(true));
        let stop = Stop;
        let out = f();
        drop(stop);
        (out, PEAK.with(Cell::get).max(0) as usize, LARGEST.with(Cell::get))
    }
}

/// What reading a mutated file may cost: a fixed allowance (buffers, the zip directory, the
/// parser's tables) plus a multiple of the file's size.
fn allowed_peak(len: usize) -> usize {
    (1 << 20) + 64 * len
}

fn allowed_largest(len: usize) -> usize {
    (256 << 10) + 2 * len
}

/// Opens `path` as PyTorch and reads every tensor, both ways; errors are fine.
fn read_torch(path: &Path) {
    if let Ok(torch) = TorchFile::open(path) {
        for (name, ..) in torch.tensors() {
            let _ = torch.read_bytes(&name);
            let _ = torch.read_f32(&name);
        }
    }
}

/// Opens `path` as safetensors and reads every tensor, every way; errors are fine.
fn read_safetensors(path: &Path) {
    if let Ok(file) = SafetensorsFile::open(path) {
        let _ = file.metadata();
        for (name, _, shape, _) in file.tensors() {
            if let Ok(info) = file.info(&name) {
                let _ = file.read_bytes(info);
            }
            let _ = file.read_f32(&name, None);
            if let &[rows, cols] = shape.as_slice() {
                let _ = file.read_f32_transposed(&name, [rows, cols]);
            }
        }
    }
}

/// Fuzzes `read` with mutations of `seed` (a whole file, or what `wrap` turns into one).
fn fuzz(target: &str, seed: Vec<u8>, fields: Vec<(usize, usize)>, wrap: fn(Vec<u8>) -> Vec<u8>, read: fn(&Path)) {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pytorch-fuzz-{target}"));
    // The seed itself reads.
    std::fs::write(&path, wrap(seed.clone())).unwrap();
    read(&path);
    let strategy = proptest::collection::vec(mutation(), 1..5);
    let result = TestRunner::new(config).run(&strategy, |mutations| {
        let bytes = wrap(mutate(seed.clone(), &fields, &mutations));
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let started = std::time::Instant::now();
        let ((), peak, largest) = allocations::measure(|| read(&path));
        let len = bytes.len();
        if peak > allowed_peak(len) || largest > allowed_largest(len) {
            return Err(TestCaseError::fail(format!(
                "reading a {len}-byte file held up to {peak} bytes (allowed {}), largest allocation {largest} \
                 (allowed {})",
                allowed_peak(len),
                allowed_largest(len)
            )));
        }
        if started.elapsed() > std::time::Duration::from_secs(5) {
            return Err(TestCaseError::fail(format!("reading a {len}-byte file took {:?}", started.elapsed())));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{target}: {e}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn mutated_pytorch_files_never_panic_or_overallocate() {
    let seed = torch_seed(true);
    let fields = zip_fields(&seed);
    fuzz("zip", seed, fields, |b| b, read_torch);
    // Without checksums, so mutated pickles and storages reach their parsers.
    let seed = torch_seed(false);
    let fields = zip_fields(&seed);
    fuzz("zip-no-crc", seed, fields, |b| b, read_torch);
    // A sound zip around a mutated pickle.
    fuzz("pickle", seed_pickle(), Vec::new(), |pickle| torch_zip(pickle, true), read_torch);
}

#[test]
fn mutated_safetensors_files_never_panic_or_overallocate() {
    let seed = safetensors_seed();
    // The header length, and the 8 bytes either side of each `data_offsets` number.
    let mut fields = vec![(0, 8), (0, 4)];
    let header = String::from_utf8_lossy(&seed[8..]).into_owned();
    fields.extend(header.match_indices("data_offsets").map(|(at, _)| (8 + at + 15, 8)));
    fuzz("safetensors", seed, fields, |b| b, read_safetensors);
}
