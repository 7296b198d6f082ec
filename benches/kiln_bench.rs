//! kiln's benchmark: every comparison measured side by side in one run, alternating between
//! kiln and its reference on every repetition, reported as medians in one table.
//!
//!     cargo bench --features wgpu,cuda,mpi --bench kiln_bench -- [--reps 3] [--quick] [--kiln-only] [--only train,checkpoint,stall,generate,data,scaling]
//!     cargo test --release --features wgpu,cuda,mpi --bench kiln_bench               (the smoke test: each CPU section once)
//!     cargo bench --features wgpu,cuda,mpi --bench kiln_bench -- --only gguf     (llama.cpp running kiln's
//!                                                   GGUF files; needs llama-cpp-python)
//!     cargo bench --features wgpu,cuda,mpi --bench kiln_bench -- --only gpu      (on a GPU machine: gpu-train,
//!                                                   gpu-stall; `bash scripts/setup-cuda.sh` first)
//!
//! References: PyTorch eager (transformers `LlamaForCausalLM`, AdamW) for training and
//! generation, Python `safetensors` and a raw fsynced sequential write for checkpoint I/O
//! (benches/torch_bench.py, which needs torch, transformers and safetensors; `--kiln-only`
//! skips the Python references, leaving those columns empty). CPU figures use two threads on
//! both sides. Timings live here, never in tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use kiln::checkpoint::policy::Kind;
use kiln::checkpoint::storage::LocalFs;
use kiln::checkpoint::sidecar::CheckpointPaths;
use kiln::checkpoint::{self, CheckpointManager};
use kiln::config::{BackendKind, Config, Precision};
use kiln::generate::{SamplingOptions, generate_ids};
use kiln::model::{CausalLm, LlamaForCausalLM};
use kiln::train::Learner;

/// A Llama shape benchmarked on both sides.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
    batch: usize,
    seq_len: usize,
    /// Size of a byte-level BPE vocabulary trained on the corpus; `None`: its characters.
    bpe_vocab: Option<usize>,
}

/// configs/tiny.toml.
const TINY: Shape = Shape { name: "tiny (0.9M)", hidden: 128, layers: 4, heads: 4, intermediate: 384, batch: 16, seq_len: 64, bpe_vocab: None };
/// configs/small-10m.toml.
const SMALL: Shape = Shape { name: "small (10.7M)", hidden: 384, layers: 6, heads: 6, intermediate: 1024, batch: 16, seq_len: 128, bpe_vocab: None };
/// The small shape with a real tokenizer's vocabulary, where the output layer and the loss
/// weigh as much as the layers below them.
const SMALL_BPE: Shape = Shape { name: "small with an 8,192-token BPE (16.9M)", bpe_vocab: Some(8192), ..SMALL };
/// About 100M parameters, for checkpoint I/O.
const LARGE: Shape = Shape { name: "100M", hidden: 768, layers: 14, heads: 12, intermediate: 2048, batch: 1, seq_len: 16, bpe_vocab: None };

struct Row {
    benchmark: String,
    kiln: f64,
    reference: Option<(String, f64)>,
    unit: &'static str,
    higher_is_better: bool,
    goal: &'static str,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn config(shape: Shape, backend: BackendKind, out: &Path) -> Result<Config> {
    config_in(shape, backend, Precision::Fp32, out)
}

/// `config` training in `precision`.
fn config_in(shape: Shape, backend: BackendKind, precision: Precision, out: &Path) -> Result<Config> {
    let tokenizer = match shape.bpe_vocab {
        Some(vocab) => format!("tokenizer = \"bpe\"\nvocab_size = {vocab}\n"),
        None => String::new(),
    };
    let text = format!(
        "output_dir = {out:?}\n[model]\nhidden_size = {}\nnum_layers = {}\nnum_heads = {}\nnum_kv_heads = {}\n\
         intermediate_size = {}\nmax_position_embeddings = {}\n[data]\npath = {:?}\ncache_dir = {:?}\nseq_len = {}\n{tokenizer}\
         [training]\nbackend = \"{}\"\nprecision = \"{}\"\nbatch_size = {}\nmax_steps = 100000\neval_batches = 1\n\
         [checkpoint]\nsave_every_steps = 0\nsave_every_epochs = 0\n[export]\non_best = false\nat_end = false\n",
        shape.hidden,
        shape.layers,
        shape.heads,
        shape.heads,
        shape.intermediate,
        shape.seq_len.max(256),
        repo().join("data/shakespeare.txt"),
        out.join("cache"),
        shape.seq_len,
        backend.name(),
        precision.name(),
        shape.batch,
    );
    Ok(Config::from_toml_str(&text, "benchmark config", &[])?)
}

/// Whether the Python references run (`--kiln-only` turns them off).
static REFERENCES: AtomicBool = AtomicBool::new(true);

const NEEDS: &str = "the references need python3 with torch, transformers and safetensors; \
                     `--kiln-only` measures kiln alone";

/// One reference measurement from benches/torch_bench.py; `None` with `--kiln-only`.
fn python(args: &[String]) -> Result<Option<serde_json::Value>> {
    if !REFERENCES.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let output = Command::new("python3")
        .arg(repo().join("benches/torch_bench.py"))
        .args(args)
        .output()
        .with_context(|| format!("cannot run python3 ({NEEDS})"))?;
    if !output.status.success() {
        bail!("torch_bench.py {args:?} failed ({NEEDS}):\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(Some(serde_json::from_str(stdout.trim().lines().last().unwrap_or("{}"))?))
}

/// `key` of a reference's reply, if the reference ran.
fn measured(reply: Option<serde_json::Value>, key: &str) -> Option<f64> {
    reply.map(|r| r[key].as_f64().unwrap_or(f64::NAN))
}

/// A row's reference: the median of its measurements, none where the references did not run.
fn reference(name: impl Into<String>, values: Vec<f64>) -> Option<(String, f64)> {
    (!values.is_empty()).then(|| (name.into(), median(values)))
}

/// The latest repetition's figure, for the progress lines.
fn last(values: &[f64]) -> Last {
    Last(values.last().copied())
}

/// A figure in a progress line: `-` where none was measured (a reference under `--kiln-only`).
struct Last(Option<f64>);

impl std::fmt::Display for Last {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0, f.precision()) {
            (Some(v), Some(digits)) => write!(f, "{v:.digits$}"),
            (Some(v), None) => write!(f, "{v}"),
            (None, _) => f.write_str("-"),
        }
    }
}

fn torch_shape_args(shape: Shape, vocab: usize) -> Vec<String> {
    [
        ("--vocab", vocab),
        ("--hidden", shape.hidden),
        ("--intermediate", shape.intermediate),
        ("--layers", shape.layers),
        ("--heads", shape.heads),
        ("--kv-heads", shape.heads),
        ("--batch", shape.batch),
        ("--seq-len", shape.seq_len),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect()
}

/// kiln's training throughput (tokens/s) over `steps` steps after `warmup`.
fn kiln_train(shape: Shape, backend: BackendKind, warmup: usize, steps: usize) -> Result<(f64, usize)> {
    kiln_train_in(shape, backend, Precision::Fp32, warmup, steps)
}

/// `kiln_train` in `precision`.
fn kiln_train_in(shape: Shape, backend: BackendKind, precision: Precision, warmup: usize, steps: usize) -> Result<(f64, usize)> {
    let dir = tempfile::tempdir()?;
    let mut learner = Learner::new(config_in(shape, backend, precision, dir.path())?)?;
    let vocab = learner.arch.vocab_size();
    let batches: Vec<_> = (0..warmup + steps).map(|_| learner.loader.next_batch().expect("a long epoch")).collect();
    for b in &batches[..warmup] {
        learner.train_step(b)?;
    }
    let start = Instant::now();
    for b in &batches[warmup..] {
        learner.train_step(b)?;
    }
    // GPU backends queue work asynchronously: wait for the last optimizer step to finish.
    learner.device.sync().map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    Ok(((steps * shape.batch * shape.seq_len) as f64 / secs, vocab))
}

fn train_section(rows: &mut Vec<Row>, reps: usize, quick: bool) -> Result<()> {
    for (shape, steps) in [(TINY, if quick { 8 } else { 20 }), (SMALL, if quick { 3 } else { 8 }), (SMALL_BPE, if quick { 2 } else { 6 })] {
        let (mut flex, mut composed, mut ndarray, mut torch) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let (t, vocab) = kiln_train(shape, BackendKind::Flex, 3, steps)?;
            flex.push(t);
            // The same backend with the fused kernels switched off: what they gain.
            kiln::fused::set_enabled(false);
            let without = kiln_train(shape, BackendKind::Flex, 3, steps);
            kiln::fused::set_enabled(true);
            composed.push(without?.0);
            ndarray.push(kiln_train(shape, BackendKind::Ndarray, 2, steps)?.0);
            let mut args = vec!["train".to_string()];
            args.extend(torch_shape_args(shape, vocab));
            args.extend(["--steps".into(), steps.to_string(), "--threads".into(), "2".into()]);
            torch.extend(measured(python(&args)?, "tokens_per_sec"));
            eprintln!(
                "bench: train {}: flex {:.0}, flex without fused kernels {:.0}, ndarray {:.0}, torch {:.0} tok/s",
                shape.name,
                last(&flex),
                last(&composed),
                last(&ndarray),
                last(&torch)
            );
        }
        let torch = reference("PyTorch eager, 2 threads", torch);
        for (backend, values) in [("flex", flex), ("flex without fused kernels", composed), ("ndarray", ndarray)] {
            rows.push(Row {
                benchmark: format!("train {} b{}x{} on {backend}", shape.name, shape.batch, shape.seq_len),
                kiln: median(values),
                reference: torch.clone(),
                unit: "tok/s",
                higher_is_better: true,
                goal: ">= 1.0x",
            });
        }
    }
    Ok(())
}

/// Peak and current resident memory of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn raw_write(path: &Path, bytes: u64) -> Result<f64> {
    use std::io::Write;
    let buf = vec![0x5au8; 8 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(path)?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let secs = start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(secs)
}

/// Loads a checkpoint into usable device tensors as a resume does: weights into the model,
/// optimizer moments into tensors in Burn layout, checksums verified while they are read.
fn kiln_load(path: &Path, model: CausalLm, device: &Device) -> Result<(f64, CausalLm)> {
    let start = Instant::now();
    let mut ck = checkpoint::open(path)?;
    let restored = kiln::resume::restore_tensors(&mut ck, model, false, device)?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(!restored.moments.is_empty(), "the checkpoint has no optimizer moments");
    Ok((secs, restored.model))
}

fn checkpoint_section(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    let dir = tempfile::tempdir_in(repo().join("target"))?;
    let mut learner = Learner::new(config(LARGE, BackendKind::Flex, &dir.path().join("run"))?)?;
    let batch = learner.loader.next_batch().expect("a batch");
    learner.train_step(&batch)?; // creates the optimizer moments
    let params = learner.arch.num_params();
    let policy = learner.checkpoints.policy().clone();
    let files = |ck_dir: &Path| ["checkpoint_latest.safetensors", "checkpoint_latest.optim.safetensors"].map(|f| ck_dir.join(f));
    let device = Device::flex();
    let mut model = CausalLm::for_loading(&learner.arch, 0.0, &device);

    let (mut save, mut raw, mut py_save, mut load, mut py_load, mut peak) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut verify = vec![];
    let mut bytes = 0u64;
    // The checkpoint's size, known after the first save (which always comes first).
    let mut size_hint = 0u64;
    for rep in 0..reps {
        // A fresh directory each time, as the raw write gets a fresh file: replacing the previous
        // checkpoint would add freeing its 1.2 GB to the timed save.
        let ck_dir = dir.path().join(format!("ck{rep}"));
        let mut manager = CheckpointManager::open(&ck_dir, policy.clone(), Arc::new(LocalFs), false)?;
        // Which write goes first alternates: this VM's disk absorbs a burst quickly and then
        // slows down, which would otherwise favour whichever always runs first.
        if rep % 2 == 1 {
            raw.push(raw_write(&dir.path().join("raw.bin"), size_hint)?);
        }
        reset_peak_memory();
        let (_, rss_before) = memory();
        let start = Instant::now();
        manager.save(vec![Kind::Latest], learner.snapshot())?;
        save.push(start.elapsed().as_secs_f64());
        let (hwm, _) = memory();
        bytes = files(&ck_dir).iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
        size_hint = bytes;
        peak.push(hwm.saturating_sub(rss_before) as f64 / bytes as f64 * 100.0);

        if rep % 2 == 0 {
            raw.push(raw_write(&dir.path().join("raw.bin"), bytes)?);
        }

        let names: Vec<String> = files(&ck_dir).iter().map(|p| p.display().to_string()).collect();
        let mut args = vec!["save".to_string(), "--files".into()];
        args.extend(names.clone());
        args.extend(["--out".into(), dir.path().join("torch.safetensors").display().to_string()]);
        py_save.extend(measured(python(&args)?, "seconds"));

        let (secs, m) = kiln_load(&files(&ck_dir)[0], model, &device)?;
        model = m;
        load.push(secs);
        // The checksums alone, with the files as warm in the page cache as the load had them:
        // the floor under a load, which must verify them (SPEC) where Python's verifies nothing.
        let start = Instant::now();
        checkpoint::verify(&CheckpointPaths::new(&ck_dir, "checkpoint_latest"))?;
        verify.push(start.elapsed().as_secs_f64());
        let mut args = vec!["load".to_string(), "--files".into()];
        args.extend(names);
        py_load.extend(measured(python(&args)?, "seconds"));
        drop(manager);
        std::fs::remove_dir_all(&ck_dir)?;
        eprintln!(
            "bench: checkpoint, seconds: save {:.2}, raw {:.2}, py {:.2} | load {:.2} (verification alone {:.2}), py {:.2} | peak +{:.1}%",
            last(&save), last(&raw), last(&py_save), last(&load), last(&verify), last(&py_load), last(&peak)
        );
    }
    let gb = bytes as f64 / 1e9;
    let label = format!("checkpoint {:.0}M params ({:.2} GB with moments)", params as f64 / 1e6, gb);
    let bw = |secs: Vec<f64>| gb / median(secs);
    // Bandwidth references: GB/s from seconds, none where the references did not run.
    let bw_reference = |name: &str, secs: Vec<f64>| reference(name, secs).map(|(name, s)| (name, gb / s));
    let raw_bw = bw(raw);
    rows.push(Row { benchmark: format!("{label}: save bandwidth"), kiln: bw(save.clone()), reference: Some(("raw fsynced write".into(), raw_bw)), unit: "GB/s", higher_is_better: true, goal: ">= 0.9x" });
    rows.push(Row { benchmark: format!("{label}: save bandwidth"), kiln: bw(save), reference: bw_reference("Python safetensors save_file + fsync", py_save), unit: "GB/s", higher_is_better: true, goal: "" });
    rows.push(Row { benchmark: format!("{label}: load to tensors"), kiln: bw(load), reference: bw_reference("Python safetensors load_file", py_load.clone()), unit: "GB/s", higher_is_better: true, goal: ">= 1.0x" });
    rows.push(Row { benchmark: format!("{label}: SHA-256 verification alone (a load's floor)"), kiln: bw(verify), reference: bw_reference("Python safetensors load_file", py_load), unit: "GB/s", higher_is_better: true, goal: "" });
    rows.push(Row { benchmark: format!("{label}: extra peak memory during save"), kiln: median(peak), reference: None, unit: "% of size", higher_is_better: false, goal: "<= 10%" });
    Ok(())
}

/// Trains `steps` steps of `shape` on `backend` with a save of `checkpoint_latest` every
/// `every` steps. Returns the mean seconds the training thread is blocked per save (snapshot
/// plus the `save` call, which for async saving includes waiting for a save still in flight)
/// and the wall time of the whole loop.
fn timed_run(shape: Shape, backend: BackendKind, async_save: bool, steps: usize, every: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir_in(repo().join("target"))?;
    let mut cfg = config(shape, backend, dir.path())?;
    cfg.checkpoint.async_save = async_save;
    let mut learner = Learner::new(cfg)?;
    let batches: Vec<_> = (0..steps + 2).map(|_| learner.loader.next_batch().expect("a batch")).collect();
    for b in &batches[..2] {
        learner.train_step(b)?;
    }
    let start = Instant::now();
    let mut blocked = Vec::new();
    let mut steps_ms = Vec::new();
    for (i, b) in batches[2..].iter().enumerate() {
        let t = Instant::now();
        learner.train_step(b)?;
        steps_ms.push(format!("{:.0}", t.elapsed().as_secs_f64() * 1000.0));
        if (i + 1) % every == 0 {
            let t = Instant::now();
            let snapshot = learner.snapshot();
            learner.checkpoints.save(vec![Kind::Latest], snapshot)?;
            blocked.push(t.elapsed().as_secs_f64());
        }
    }
    learner.checkpoints.wait()?;
    let wall = start.elapsed().as_secs_f64();
    let blocked_ms: Vec<String> = blocked.iter().map(|b| format!("{:.1}", b * 1000.0)).collect();
    eprintln!(
        "bench: {} save{}: blocked ms per save [{}], step ms [{}]",
        if async_save { "async" } else { "sync" },
        if blocked.len() == 1 { "" } else { "s" },
        blocked_ms.join(" "),
        steps_ms.join(" ")
    );
    Ok((blocked.iter().sum::<f64>() / blocked.len() as f64, wall))
}

fn stall_section(rows: &mut Vec<Row>, reps: usize, quick: bool) -> Result<()> {
    let (steps, every) = if quick { (6, 3) } else { (12, 3) };
    stall_rows(rows, reps, SMALL, BackendKind::Flex, steps, every)
}

/// Blocked time per checkpoint, async against sync, alternating on every repetition.
fn stall_rows(rows: &mut Vec<Row>, reps: usize, shape: Shape, backend: BackendKind, steps: usize, every: usize) -> Result<()> {
    let (mut sync, mut asynchronous, mut sync_wall, mut async_wall) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let (s, sw) = timed_run(shape, backend, false, steps, every)?;
        let (a, aw) = timed_run(shape, backend, true, steps, every)?;
        sync.push(s * 1000.0);
        asynchronous.push(a * 1000.0);
        sync_wall.push(sw);
        async_wall.push(aw);
        eprintln!("bench: stall per save: sync {:.1} ms, async {:.1} ms (loops {:.2}s / {:.2}s)", s * 1000.0, a * 1000.0, sw, aw);
    }
    rows.push(Row {
        benchmark: format!("training thread blocked per checkpoint, {} model on {}", shape.name, backend.name()),
        kiln: median(asynchronous),
        reference: Some(("synchronous save".into(), median(sync))),
        unit: "ms",
        higher_is_better: false,
        goal: "<= 0.1x",
    });
    rows.push(Row {
        benchmark: format!("{steps} steps with a save every {every} ({} on {}), async (wall)", shape.name, backend.name()),
        kiln: median(async_wall),
        reference: Some(("synchronous saves".into(), median(sync_wall))),
        unit: "s",
        higher_is_better: false,
        goal: "",
    });
    Ok(())
}

fn generate_section(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    let new_tokens = 100;
    let device = Device::flex();
    let vocab = 84;
    let shape = kiln::model::LlamaShape {
        vocab_size: vocab,
        hidden_size: SMALL.hidden,
        num_layers: SMALL.layers,
        num_heads: SMALL.heads,
        num_kv_heads: SMALL.heads,
        intermediate_size: SMALL.intermediate,
        max_position_embeddings: 512,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
    };
    let model = LlamaForCausalLM::init(&shape, 0.02, 0.0, 0, &device);
    let prompt: Vec<u32> = (0..SMALL.seq_len as u32).map(|i| i % vocab as u32).collect();
    let options = SamplingOptions { max_new_tokens: new_tokens, temperature: 0.0, top_k: None, seed: 0, eos_token_ids: Vec::new() };
    generate_ids(&model, &prompt, &SamplingOptions { max_new_tokens: 8, ..options.clone() }, &device)?;
    let (mut ours, mut theirs) = (vec![], vec![]);
    for _ in 0..reps {
        let start = Instant::now();
        let out = generate_ids(&model, &prompt, &options, &device)?;
        ours.push(out.len() as f64 / start.elapsed().as_secs_f64());
        let mut args = vec!["generate".to_string()];
        args.extend(torch_shape_args(SMALL, vocab));
        args.extend(["--new-tokens".into(), new_tokens.to_string()]);
        theirs.extend(measured(python(&args)?, "tokens_per_sec"));
        eprintln!("bench: generate: kiln {:.1} torch {:.1} tok/s", last(&ours), last(&theirs));
    }
    rows.push(Row {
        benchmark: format!("generate {} greedy, prompt {}, +{new_tokens} tokens (KV cache)", SMALL.name, SMALL.seq_len),
        kiln: median(ours),
        reference: reference("transformers generate, 2 threads", theirs),
        unit: "tok/s",
        higher_is_better: true,
        goal: ">= 1.0x",
    });
    Ok(())
}

/// GPT-2 small's body (768 wide, 12 layers, 12 heads) as a Llama with a SwiGLU MLP: 113M
/// parameters with the corpus' small vocabulary (GPT-2's 124M count includes a 50257-token
/// embedding).
const GPT2_SMALL: Shape = Shape { name: "GPT-2-small-sized (113M)", hidden: 768, layers: 12, heads: 12, intermediate: 3072, batch: 8, seq_len: 512, bpe_vocab: None };

/// The GPU backends this build has and this machine can run.
fn gpu_backends() -> Result<Vec<BackendKind>> {
    let backends: Vec<BackendKind> = [BackendKind::Wgpu, BackendKind::Cuda]
        .into_iter()
        .filter(|&backend| match kiln::backend::device(backend) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("bench: gpu: {} skipped: {e:#}", backend.name());
                false
            }
        })
        .collect();
    if backends.is_empty() {
        bail!("--only gpu: neither wgpu nor cuda is usable in this build on this machine");
    }
    Ok(backends)
}

/// Training throughput on each GPU backend in fp32 and, where the backend computes in it,
/// bf16, against PyTorch eager in the same precision (bf16: autocast, SDPA attention).
fn gpu_train_section(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    let (shape, available) = (GPT2_SMALL, gpu_backends()?);
    let (warmup, steps) = (3, 10);
    for precision in [Precision::Fp32, Precision::Bf16] {
        // wgpu's WGSL has no bf16 type (README, How training works).
        let backends: Vec<BackendKind> =
            available.iter().copied().filter(|&b| precision == Precision::Fp32 || b == BackendKind::Cuda).collect();
        if backends.is_empty() {
            eprintln!("bench: gpu train {}: no backend of this build computes in it here", precision.name());
            continue;
        }
        let mut ours = vec![Vec::new(); backends.len()];
        let (mut torch, mut gpu_name) = (Vec::new(), String::new());
        for _ in 0..reps {
            let mut vocab = 0;
            for (values, &backend) in ours.iter_mut().zip(&backends) {
                let (tokens_per_sec, v) = kiln_train_in(shape, backend, precision, warmup, steps)?;
                values.push(tokens_per_sec);
                vocab = v;
            }
            let mut args = vec!["train".to_string()];
            args.extend(torch_shape_args(shape, vocab));
            args.extend(["--steps".into(), steps.to_string(), "--warmup".into(), warmup.to_string(), "--device".into(), "cuda".into()]);
            args.extend(["--precision".into(), precision.name().into()]);
            if let Some(reply) = python(&args)? {
                torch.push(reply["tokens_per_sec"].as_f64().unwrap_or(f64::NAN));
                gpu_name = format!("{}, torch {}", reply["device"].as_str().unwrap_or("?"), reply["torch"].as_str().unwrap_or("?"));
            }
            let kiln: Vec<String> = ours.iter().zip(&backends).map(|(v, b)| format!("{} {:.0}", b.name(), last(v))).collect();
            eprintln!("bench: gpu train {} {}: kiln {}, torch cuda {:.0} tok/s", shape.name, precision.name(), kiln.join(", "), last(&torch));
        }
        let label = match precision {
            Precision::Fp32 => "PyTorch eager fp32",
            _ => "PyTorch eager bf16 (autocast, SDPA)",
        };
        let torch = reference(format!("{label} on CUDA ({gpu_name})"), torch);
        for (values, &backend) in ours.into_iter().zip(&backends) {
            rows.push(Row {
                benchmark: format!("train {} b{}x{} {} on {}", shape.name, shape.batch, shape.seq_len, precision.name(), backend.name()),
                kiln: median(values),
                reference: torch.clone(),
                unit: "tok/s",
                higher_is_better: true,
                goal: ">= 1.0x",
            });
        }
    }
    Ok(())
}

/// A save reads the weights and moments back from GPU memory: the stall that matters most.
/// Saves are 16 steps apart (~4 s on an H100): at 8 (~2 s) the 1.36 GB checkpoints came faster
/// than that machine's disk took them, and the second save waited for the first one's writeback.
fn gpu_stall_section(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    for backend in gpu_backends()? {
        stall_rows(rows, reps, GPT2_SMALL, backend, 32, 16)?;
    }
    Ok(())
}

/// A child process's wall time and peak resident memory (bytes), its output kept in `log`.
/// The peak is the child's own `VmHWM`, read every 5 ms while it runs: `wait4`'s `ru_maxrss`
/// would also count this process's memory, which a spawned child shares until it execs.
fn run_measured(cmd: &mut Command, log: &Path) -> Result<(f64, u64)> {
    let out = std::fs::File::create(log)?;
    let start = Instant::now();
    let mut child = cmd.stdout(out.try_clone()?).stderr(out).spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let status = std::fs::read_to_string(&status_file).unwrap_or_default();
        if let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()) {
            peak = peak.max(kb * 1024);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{cmd:?} failed:\n{}", std::fs::read_to_string(log).unwrap_or_default());
    }
    Ok((secs, peak))
}

/// The prepared data path: `kiln prepare` against nanoGPT-style Python on the same jsonl and
/// parquet files and `tokenizer.json`, a run's start and peak memory on that corpus against the
/// 5 MB demo corpus, and the training loader's share of a step.
fn data_section(rows: &mut Vec<Row>, reps: usize, smoke: bool, quick: bool) -> Result<()> {
    use kiln::config::{SourceConfig, TokenizerKind, TokenizerSetting};
    use kiln::prepare::{TokenizerChoice, prepare};
    let (mb, vocab) = if smoke { (4.0, 1024) } else if quick { (30.0, 32768) } else { (300.0, 32768) };
    let dir = tempfile::tempdir_in(repo().join("target"))?;
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let script = repo().join("benches/prepare_bench.py");
    let mut base = config(TINY, BackendKind::Flex, &dir.path().join("run"))?;
    base.training.max_steps = 1;

    // One byte-level BPE for both sides, trained by kiln on the demo corpus (untimed).
    let mut tok_data = base.data.clone();
    tok_data.tokenizer = TokenizerSetting::Train(TokenizerKind::Bpe);
    tok_data.vocab_size = vocab;
    tok_data.tokenizer_sample_mib = 8;
    let tokenizer = dir.path().join("bench-tokenizer.json");
    std::fs::copy(prepare(&tok_data, &TokenizerChoice::from_config(&tok_data)?)?.dir.join("tokenizer.json"), &tokenizer)?;

    let corpus = dir.path().join("corpus");
    let made = Command::new("python3").arg(&script).arg("corpus").arg(&corpus).arg(mb.to_string()).output()?;
    anyhow::ensure!(made.status.success(), "prepare_bench.py corpus failed (needs pyarrow): {}", String::from_utf8_lossy(&made.stderr));
    let on_disk = serde_json::from_slice::<serde_json::Value>(&made.stdout)?["bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let text_mb = serde_json::from_slice::<serde_json::Value>(&made.stdout)?["text_bytes"].as_f64().unwrap_or(0.0) / 1e6;
    let files = |kind: &str| -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(corpus.join(kind))?.map(|e| Ok(e?.path())).collect::<Result<_>>()?;
        v.sort();
        Ok(v)
    };
    let all_files: Vec<PathBuf> = [files("jsonl")?, files("parquet")?].concat();

    base.data.tokenizer = TokenizerSetting::File(tokenizer.clone());
    let write = |name: &str, c: Config| -> Result<PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(&path, c.to_toml_string())?;
        Ok(path)
    };
    let mut big = base.clone();
    big.data.cache_dir = dir.path().join("big-cache");
    big.data.sources = ["jsonl/*.jsonl", "parquet/*.parquet"]
        .iter()
        .map(|p| SourceConfig { path: corpus.join(p), text_field: "text".into(), weight: None, split: Default::default() })
        .collect();
    let big_cfg = write("big.toml", big.clone())?;
    let demo_cfg = write("demo.toml", base.clone())?;

    let (mut kiln_mbs, mut py_mbs, mut prep_peak) = (vec![], vec![], vec![]);
    let mut eos = None;
    for rep in 0..reps {
        let _ = std::fs::remove_dir_all(&big.data.cache_dir);
        let (secs, peak) = run_measured(Command::new(kiln_bin).arg("prepare").arg("--config").arg(&big_cfg), &dir.path().join("prepare.log"))?;
        kiln_mbs.push(text_mb / secs);
        prep_peak.push(peak as f64 / 1e6);
        let prepared = kiln::prepare::find(&big.data, &TokenizerChoice::from_config(&big.data)?)?.context("kiln prepare left no dataset")?;
        let manifest = kiln::dataset::Manifest::read(&prepared)?;
        eos = manifest.eos_token_id;
        if REFERENCES.load(Ordering::Relaxed) {
            let out = Command::new("python3")
                .arg(&script)
                .arg("reference")
                .arg(&tokenizer)
                .arg(eos.context("the BPE has an end-of-text id")?.to_string())
                .arg(dir.path().join("reference.bin"))
                .args(&all_files)
                .output()?;
            anyhow::ensure!(out.status.success(), "prepare_bench.py reference failed: {}", String::from_utf8_lossy(&out.stderr));
            let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            // Both sides did the same work: the same token stream.
            use sha2::Digest;
            let mut sha = sha2::Sha256::new();
            for shard in &manifest.shards {
                sha.update(std::fs::read(prepared.join(&shard.path))?);
            }
            let kiln_sha = kiln::safetensors_io::hex(&sha.finalize());
            anyhow::ensure!(reply["sha256"].as_str() == Some(kiln_sha.as_str()), "kiln prepare and the Python reference wrote different tokens");
            py_mbs.push(text_mb / reply["seconds"].as_f64().unwrap_or(f64::NAN));
            let _ = std::fs::remove_file(dir.path().join("reference.bin"));
        }
        eprintln!("bench: prepare {text_mb:.0} MB (rep {rep}): kiln {:.1} MB/s, python {:.1} MB/s", last(&kiln_mbs), last(&py_mbs));
    }
    let label = format!("prepare {text_mb:.0} MB of text as jsonl + parquet ({on_disk:.0} MB on disk), {vocab}-token BPE, 2 threads");
    rows.push(Row {
        benchmark: label.clone(),
        kiln: median(kiln_mbs),
        reference: reference("nanoGPT-style Python (HF tokenizers encode_batch, numpy tofile)", py_mbs),
        unit: "MB/s",
        higher_is_better: true,
        goal: ">= 2.0x",
    });
    rows.push(Row { benchmark: format!("{label}: peak memory"), kiln: median(prep_peak), reference: None, unit: "MB", higher_is_better: false, goal: "" });

    // A run's start on each corpus, both prepared (the demo one untimed here).
    run_measured(Command::new(kiln_bin).arg("prepare").arg("--config").arg(&demo_cfg), &dir.path().join("prepare.log"))?;
    let (mut big_secs, mut demo_secs, mut big_peak, mut demo_peak) = (vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        for (cfg, secs, peak) in [(&big_cfg, &mut big_secs, &mut big_peak), (&demo_cfg, &mut demo_secs, &mut demo_peak)] {
            let out = dir.path().join(format!("run-{rep}-{}", secs.len() + peak.len()));
            let (s, p) = run_measured(Command::new(kiln_bin).arg("train").arg("--config").arg(cfg).arg("--output-dir").arg(&out), &dir.path().join("train.log"))?;
            secs.push(s);
            peak.push(p as f64 / 1e6);
            let _ = std::fs::remove_dir_all(&out);
        }
        eprintln!("bench: first step: {text_mb:.0} MB corpus {:.2} s, demo {:.2} s", last(&big_secs), last(&demo_secs));
    }
    let demo_mb = std::fs::metadata(repo().join("data/shakespeare.txt"))?.len() as f64 / 1e6;
    rows.push(Row {
        benchmark: format!("kiln train to its first step (tiny shape), {text_mb:.0} MB prepared corpus"),
        kiln: median(big_secs),
        reference: reference(format!("the {demo_mb:.0} MB demo corpus"), demo_secs),
        unit: "s",
        higher_is_better: false,
        goal: "about 1.0x",
    });
    rows.push(Row {
        benchmark: format!("kiln train to its first step: peak memory, {text_mb:.0} MB prepared corpus"),
        kiln: median(big_peak),
        reference: reference(format!("the {demo_mb:.0} MB demo corpus"), demo_peak),
        unit: "MB",
        higher_is_better: false,
        goal: "within 100 MB",
    });

    // The loader's share of a step on the small shape: serving batches from the big corpus's
    // maps against a training step's time.
    let prepared = kiln::prepare::find(&big.data, &TokenizerChoice::from_config(&big.data)?)?.context("prepared above")?;
    let corpus = Arc::new(kiln::data::Corpus::new(kiln::dataset::Dataset::open(&prepared)?, None, 0.1, SMALL.seq_len)?);
    let mut loader = kiln::data::TrainLoader::new(corpus, SMALL.seq_len, SMALL.batch, 1)?;
    let batches = if quick { 50 } else { 500 };
    let start = Instant::now();
    for _ in 0..batches {
        std::hint::black_box(loader.next_batch().context("an epoch longer than the benchmark")?);
    }
    let per_batch = start.elapsed().as_secs_f64() / batches as f64;
    let (tokens_per_sec, _) = kiln_train(SMALL, BackendKind::Flex, 1, if quick { 2 } else { 5 })?;
    let step = (SMALL.batch * SMALL.seq_len) as f64 / tokens_per_sec;
    eprintln!("bench: loading {:.1} us per batch against a {:.0} ms step (eos {eos:?})", per_batch * 1e6, step * 1e3);
    rows.push(Row {
        benchmark: format!("loading a batch (small shape b{}x{}, {text_mb:.0} MB corpus) against a training step", SMALL.batch, SMALL.seq_len),
        kiln: 100.0 * per_batch / step,
        reference: None,
        unit: "% of a step",
        higher_is_better: false,
        goal: "< 1%",
    });
    Ok(())
}

/// Data-parallel scaling on this machine: the small shape's global batch of 16 trained by one
/// process on two threads against two processes (`kiln train --nproc 2`, one thread each, 8
/// windows each), both through the CLI, and the gradient all-reduce's share of the
/// two-process step (`allreduce_seconds` in `metrics.jsonl`). Throughput is the last log
/// window's, which leaves out the first steps' warm-up and the final evaluation.
fn scaling_section(rows: &mut Vec<Row>, reps: usize, quick: bool) -> Result<()> {
    if !cfg!(feature = "mpi") {
        bail!("--only scaling needs a build with the mpi feature (cargo bench --features mpi)");
    }
    let steps = if quick { 4 } else { 12 };
    let dir = tempfile::tempdir_in(repo().join("target"))?;
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let (mut one, mut two, mut share) = (vec![], vec![], vec![]);
    for rep in 0..reps {
        for nproc in [1usize, 2] {
            let out = dir.path().join(format!("run-{rep}-{nproc}"));
            let mut c = config(SMALL, BackendKind::Flex, &out)?;
            c.data.cache_dir = dir.path().join("cache");
            c.training.batch_size = SMALL.batch / nproc;
            c.training.max_steps = steps;
            c.training.log_every_steps = steps / 2;
            c.training.eval_every_steps = steps;
            let cfg = dir.path().join(format!("scaling-{nproc}.toml"));
            std::fs::write(&cfg, c.to_toml_string())?;
            let mut cmd = Command::new(kiln_bin);
            cmd.arg("train").arg("--config").arg(&cfg).arg("--nproc").arg(nproc.to_string());
            // Two cores in both runs, whatever the machine has.
            cmd.env("RAYON_NUM_THREADS", (2 / nproc).to_string());
            run_measured(&mut cmd, &dir.path().join("scaling.log"))?;
            let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
            let record: kiln::metrics::MetricRecord = text
                .lines()
                .filter_map(|l| serde_json::from_str::<kiln::metrics::MetricRecord>(l).ok())
                .filter(|r| r.tokens_per_sec.is_some())
                .last()
                .context("metrics.jsonl has no throughput line")?;
            let tokens_per_sec = record.tokens_per_sec.unwrap_or(f64::NAN);
            if nproc == 1 {
                one.push(tokens_per_sec);
            } else {
                two.push(tokens_per_sec);
                let step = (SMALL.batch * SMALL.seq_len) as f64 / tokens_per_sec;
                share.push(100.0 * record.allreduce_seconds.context("a 2-process run logs allreduce_seconds")? / step);
            }
            let _ = std::fs::remove_dir_all(&out);
        }
        eprintln!("bench: scaling: 1 x 2 threads {:.0} tok/s, 2 x 1 thread {:.0} tok/s, all-reduce {:.1}% of a step", last(&one), last(&two), last(&share));
    }
    let name = format!("train small (10.7M) global batch {}x{} on flex", SMALL.batch, SMALL.seq_len);
    rows.push(Row {
        benchmark: format!("{name}: 2 processes x 1 thread (--nproc 2)"),
        kiln: median(two),
        reference: reference("1 process x 2 threads", one),
        unit: "tok/s",
        higher_is_better: true,
        goal: "",
    });
    rows.push(Row {
        benchmark: format!("{name}: gradient all-reduce, 2 processes"),
        kiln: median(share),
        reference: None,
        unit: "% of a step",
        higher_is_better: false,
        goal: "",
    });
    Ok(())
}

/// llama.cpp running kiln's GGUF files (`--only gguf`; needs llama-cpp-python, which compiles
/// llama.cpp from source, so it is not part of the smoke test): a small byte-level-BPE Llama
/// trained briefly, written as f32 and q8_0 GGUF, scored on a held-out text and continued
/// greedily by llama.cpp and by kiln (reading the same file), on token ids. The f32 file must
/// give kiln's loss to 1e-3 relative and kiln's greedy tokens; q8_0 is reported.
fn gguf_section(rows: &mut Vec<Row>) -> Result<()> {
    use kiln::config::{TokenizerKind, TokenizerSetting};
    let dir = tempfile::tempdir_in(repo().join("target"))?;
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let mut c = config(Shape { bpe_vocab: Some(512), ..TINY }, BackendKind::Flex, &dir.path().join("run"))?;
    c.data.tokenizer = TokenizerSetting::Train(TokenizerKind::Bpe);
    c.training.max_steps = 200;
    c.training.eval_every_steps = 200;
    c.export.at_end = true;
    let mut learner = Learner::new(c)?;
    learner.fit()?;
    let bundle = learner.exported.last().context("the final bundle")?.clone();
    let text = std::fs::read_to_string(repo().join("data/shakespeare.txt"))?;
    let sample = &text[text.len() - 3000..];
    let text_path = dir.path().join("text.txt");
    std::fs::write(&text_path, sample)?;
    let all_ids = learner.tokenizer.encode(sample)?;
    let ids = &all_ids;
    let ids = &ids[..ids.len().min(TINY.seq_len.max(256) - 8)];
    let ids_path = dir.path().join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(ids)?)?;
    let (prompt_len, new_tokens) = (16, 32);
    for ty in ["f32", "q8_0", "q4_0"] {
        let file = dir.path().join(format!("model-{ty}.gguf"));
        let out = Command::new(kiln_bin).args(["quantize"]).arg(&bundle).args(["--type", ty, "--out"]).arg(&file).output()?;
        anyhow::ensure!(out.status.success(), "kiln quantize: {}", String::from_utf8_lossy(&out.stderr));
        // kiln on the same file, read back dequantized.
        let model_dir = dir.path().join(format!("back-{ty}"));
        kiln::gguf_model::GgufModel::open(&file)?.write_dir(&model_dir)?;
        let device = kiln::backend::device(BackendKind::Flex)?;
        let p = kiln::pretrained::load(&model_dir, &device, &kiln::pretrained::LoadOptions::with_rules(&[])?)?;
        let ours = kiln::evaluate::score(&p.model, ids, ids.len(), 1, &device)?.cross_entropy;
        let options = SamplingOptions { max_new_tokens: new_tokens, temperature: 0.0, top_k: None, seed: 0, eos_token_ids: vec![] };
        let our_greedy = generate_ids(&p.model, &ids[..prompt_len], &options, &device)?;
        let reply = Command::new("python3")
            .arg(repo().join("benches/llama_cpp_check.py"))
            .arg(&file)
            .arg(&ids_path)
            .args(["--prompt-len", &prompt_len.to_string(), "--new-tokens", &new_tokens.to_string(), "--text"])
            .arg(&text_path)
            .output()?;
        anyhow::ensure!(reply.status.success(), "llama_cpp_check.py failed (needs `pip install cmake ninja llama-cpp-python`): {}", String::from_utf8_lossy(&reply.stderr));
        let reply: serde_json::Value = serde_json::from_slice(reply.stdout.trim_ascii())?;
        let theirs = reply["cross_entropy"].as_f64().unwrap_or(f64::NAN);
        let their_greedy: Vec<u32> = reply["greedy"].as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as u32)).collect();
        let same = our_greedy.iter().zip(&their_greedy).take_while(|(a, b)| a == b).count();
        // llama.cpp's tokenizer, from the file's metadata, against kiln's.
        let their_ids: Vec<u32> = reply["text_ids"].as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as u32)).collect();
        anyhow::ensure!(their_ids == all_ids, "llama.cpp tokenizes the text into {} ids, kiln into {}; they differ", their_ids.len(), all_ids.len());
        eprintln!("bench: gguf {ty}: llama.cpp loss {theirs:.5}, kiln {ours:.5}; greedy agrees on {same} of {new_tokens} tokens");
        if ty == "f32" {
            anyhow::ensure!((theirs - ours).abs() <= 1e-3 * ours, "llama.cpp scores the f32 GGUF {theirs}, kiln {ours}");
            anyhow::ensure!(same == new_tokens, "llama.cpp's greedy continuation {their_greedy:?} is not kiln's {our_greedy:?}");
        }
        rows.push(Row {
            benchmark: format!("GGUF {ty} ({} tokens, 512-token BPE): cross-entropy in llama.cpp, kiln reading the same file", ids.len()),
            kiln: ours,
            reference: Some(("llama.cpp (llama-cpp-python)".to_string(), theirs)),
            unit: "nats/token",
            higher_is_better: false,
            goal: if ty == "f32" { "1.00x" } else { "" },
        });
        rows.push(Row {
            benchmark: format!("GGUF {ty}: greedy tokens llama.cpp continues as kiln does"),
            kiln: same as f64,
            reference: None,
            unit: "of 32",
            higher_is_better: true,
            goal: if ty == "f32" { "32" } else { "" },
        });
    }
    // Pretrained tokenizers in their three llama.cpp forms: Llama-2's byte-fallback BPE as
    // `llama`, Llama-3's and GPT-2's byte-level BPE as `gpt2` (pre `llama-bpe`, `gpt-2`).
    let hf_compat = |args: &[&str]| -> Result<()> {
        let out = Command::new("python3").arg(repo().join("tests/python/hf_compat.py")).args(args).output()?;
        anyhow::ensure!(out.status.success(), "hf_compat.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let mixed = dir.path().join("mixed.txt");
    std::fs::write(&mixed, "Hello world, héllo wörld! 12 345 6789\n\tTabs and  spaces. The quick brown fox's tail.\n")?;
    let tokenizers = dir.path().join("tokenizers");
    hf_compat(&["make-tokenizers", tokenizers.to_str().unwrap(), "--text", mixed.to_str().unwrap()])?;
    std::fs::write(dir.path().join("hf-ids.json"), "[1, 40, 41]")?;
    for (name, special) in [("llama2", "1,2"), ("llama3", "0,1"), ("gpt2", "0,0")] {
        let hf = dir.path().join(format!("hf-{name}"));
        hf_compat(&["make-model", hf.to_str().unwrap(), "--ids", dir.path().join("hf-ids.json").to_str().unwrap(), "--vocab", "500",
            "--tokenizer-from", tokenizers.join(name).to_str().unwrap(), "--special-ids", special, "--new-tokens", "1"])?;
        let file = dir.path().join(format!("{name}.gguf"));
        let out = Command::new(kiln_bin).arg("quantize").arg(&hf).args(["--type", "f32", "--out"]).arg(&file).output()?;
        anyhow::ensure!(out.status.success(), "kiln quantize {name}: {}", String::from_utf8_lossy(&out.stderr));
        let reply = Command::new("python3").arg(repo().join("benches/llama_cpp_check.py")).arg("tokens").arg(&file).arg(&mixed).output()?;
        anyhow::ensure!(reply.status.success(), "llama_cpp_check.py tokens: {}", String::from_utf8_lossy(&reply.stderr));
        let theirs: Vec<u32> = serde_json::from_slice::<serde_json::Value>(reply.stdout.trim_ascii())?["ids"]
            .as_array().into_iter().flatten().filter_map(|v| v.as_u64().map(|v| v as u32)).collect();
        let tokenizer = kiln::tokenizer::KilnTokenizer::from_dir(&hf)?.context("a tokenizer")?;
        let ours = tokenizer.encode_corpus(&std::fs::read_to_string(&mixed)?)?;
        eprintln!("bench: gguf tokenizer {name}: llama.cpp {} ids, kiln {} ids, equal: {}", theirs.len(), ours.len(), theirs == ours);
        rows.push(Row {
            benchmark: format!("GGUF tokenizer of a {name}-style tokenizer.json in llama.cpp: ids equal to kiln's on mixed text"),
            kiln: f64::from(u8::from(theirs == ours)),
            reference: None,
            unit: "(1 = equal)",
            higher_is_better: true,
            goal: "1",
        });
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!("| benchmark | kiln | reference | ratio | goal |");
    println!("| --- | ---: | --- | ---: | --- |");
    for r in rows {
        let fmt = |v: f64| if v >= 100.0 { format!("{v:.0}") } else if v >= 0.01 || v == 0.0 { format!("{v:.2}") } else { format!("{v:.1e}") };
        let (reference, ratio) = match &r.reference {
            Some((name, v)) => {
                let ratio = if r.higher_is_better { r.kiln / v } else { r.kiln / v };
                (format!("{name}: {} {}", fmt(*v), r.unit), format!("{ratio:.2}x"))
            }
            None => ("-".to_string(), "-".to_string()),
        };
        println!("| {} | {} {} | {reference} | {ratio} | {} |", r.benchmark, fmt(r.kiln), r.unit, r.goal);
    }
}

fn main() -> Result<()> {
    kiln::backend::tune_process(); // as the kiln binary does
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    // `cargo bench` passes `--bench`. Without it and without any of this harness's options,
    // `cargo test` is running this binary (Cargo.toml: `test = true`): a smoke test that every
    // CPU section and its reference still run, once and briefly, so the harness cannot rot
    // unnoticed. A test-name filter skips it.
    let smoke = !["--bench", "--only", "--reps", "--quick", "--kiln-only"].iter().any(|f| flag(f));
    if smoke && args.iter().any(|a| !a.starts_with('-')) {
        println!("kiln_bench: smoke test filtered out");
        return Ok(());
    }
    let reps: usize = value("--reps").map(|v| v.parse()).transpose()?.unwrap_or(if smoke { 1 } else { 3 });
    let quick = smoke || flag("--quick");
    REFERENCES.store(!flag("--kiln-only"), Ordering::Relaxed);
    // The GPU section trains a 124M model: only on request, and only where a real GPU is
    // (on a CPU Vulkan driver such as lavapipe it would run for hours).
    let every_cpu_section = if cfg!(feature = "mpi") { "train,checkpoint,stall,generate,data,scaling" } else { "train,checkpoint,stall,generate,data" };
    let only = value("--only").unwrap_or_else(|| every_cpu_section.into());
    let wants = |s: &str| only.split(',').any(|o| o == s);
    // Both sides run on two threads, the machine size these figures are meant for.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any thread is started.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    let mut rows = Vec::new();
    if wants("train") {
        train_section(&mut rows, reps, quick)?;
    }
    if wants("checkpoint") {
        checkpoint_section(&mut rows, reps)?;
    }
    if wants("stall") {
        stall_section(&mut rows, reps, quick)?;
    }
    if wants("generate") {
        generate_section(&mut rows, reps)?;
    }
    if wants("data") {
        data_section(&mut rows, reps, smoke, quick)?;
    }
    if wants("scaling") {
        scaling_section(&mut rows, reps, quick)?;
    }
    if wants("gguf") {
        gguf_section(&mut rows)?;
    }
    if wants("gpu") || wants("gpu-train") {
        gpu_train_section(&mut rows, reps)?;
    }
    if wants("gpu") || wants("gpu-stall") {
        gpu_stall_section(&mut rows, reps)?;
    }
    print_table(&rows);
    if smoke {
        check_smoke(&rows)?;
    }
    Ok(())
}

/// The smoke test's verdict: each CPU section gave its rows, and every figure, kiln's and the
/// references', is a measurement (finite and positive; the memory row may be zero).
fn check_smoke(rows: &[Row]) -> Result<()> {
    let mut sections = vec!["train ", "checkpoint ", "training thread blocked", "generate ", "prepare ", "kiln train to its first step", "loading a batch"];
    if cfg!(feature = "mpi") {
        sections.push("train small (10.7M) global batch");
    }
    for section in sections {
        anyhow::ensure!(rows.iter().any(|r| r.benchmark.starts_with(section)), "smoke test: no `{section}` rows");
    }
    for r in rows {
        let measured = |v: f64| v.is_finite() && (v > 0.0 || (v == 0.0 && !r.higher_is_better));
        anyhow::ensure!(measured(r.kiln), "smoke test: `{}` measured {}", r.benchmark, r.kiln);
        if let Some((name, v)) = &r.reference {
            anyhow::ensure!(measured(*v), "smoke test: `{}`: reference {name} measured {v}", r.benchmark);
        }
    }
    println!("kiln_bench: smoke test passed ({} rows)", rows.len());
    Ok(())
}
