//! The `kiln` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{BackendKind, Config};
use crate::distributed::World;
use crate::train::{Learner, StopReason, install_signal_handler};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train Llama-style language models with Burn, on CPU or GPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a TOML config.
    Train(TrainArgs),
    /// Tokenize a config's data sources into token shards under `data.cache_dir` (what
    /// `train` does first when they are not prepared yet); prints the prepared directory.
    Prepare(PrepareArgs),
    /// Export any checkpoint as a Hugging Face-compatible inference bundle.
    Export(ExportArgs),
    /// Generate text with a bundle, a Hugging Face directory or a GGUF file.
    Generate(GenerateArgs),
    /// Mean cross-entropy (nats/token) and perplexity of a model on a text file.
    Eval(EvalArgs),
    /// Show a .safetensors file's tensors and metadata (and, for a checkpoint, its sidecar and
    /// whether its checksums verify).
    Inspect(InspectArgs),
    /// List the checkpoints of a run: kind, epoch, step, tracked metric, size, validity.
    Checkpoints(CheckpointsArgs),
    /// Convert a weights file by extension: a PyTorch .bin/.pt/.pth (read without running its
    /// pickle) or a .gguf to .safetensors; any of them (or .safetensors) to a .json dump.
    /// Never overwrites OUT.
    Convert(ConvertArgs),
    /// Write a model (bundle, Hugging Face directory or checkpoint) as a GGUF file llama.cpp
    /// runs: f32, f16, bf16, q8_0 or q4_0.
    Quantize(QuantizeArgs),
    /// Merge models with a mergekit YAML recipe (linear, slerp, task_arithmetic, ties,
    /// dare_ties, dare_linear) into a bundle.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The mergekit recipe; model paths in it are relative to the current directory.
    #[arg(long, value_name = "RECIPE.yml")]
    pub config: PathBuf,
    /// The bundle directory to write; must not exist yet.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the random masks of dare_ties and dare_linear.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Shard the weights past this size ("500MB", "2GB", or bytes).
    #[arg(long, value_name = "SIZE", default_value = "2GB")]
    pub max_shard_size: String,
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A kiln bundle, a Hugging Face directory (Llama, Mistral, Qwen2) or a kiln checkpoint.
    pub model: PathBuf,
    /// The matrices' encoding: f32, f16, bf16, q8_0 or q4_0 (norms and biases stay f32).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_quant_type)]
    pub ty: crate::quantize::QuantType,
    /// The .gguf file to write; must not exist yet.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
}

fn parse_quant_type(s: &str) -> Result<crate::quantize::QuantType, String> {
    crate::quantize::QuantType::parse(s).ok_or_else(|| format!("unknown type `{s}`; expected f32, f16, bf16, q8_0 or q4_0"))
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The file to convert (`pytorch_model.bin`, `.pt`, `.pth`).
    pub input: PathBuf,
    /// The file to write (`.safetensors`); must not exist yet.
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The checkpoint (any of its files).
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Version in the bundle name; defaults to the run's `export.version`.
    #[arg(long)]
    pub version: Option<String>,
    /// Bundle directory; defaults to `<output_dir>/models/inference/model_<version>_step<N>`.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Shard the weights past this size ("500MB", "2GB", or bytes); defaults to the run's.
    #[arg(long, value_name = "SIZE")]
    pub max_shard_size: Option<String>,
    /// The weights' dtype: float32, bfloat16 or float16 (bf16, fp16); defaults to the run's
    /// `export.dtype`.
    #[arg(long, value_name = "DTYPE", value_parser = parse_export_dtype)]
    pub dtype: Option<crate::config::ExportDtype>,
    /// A custom entry of the weights files' safetensors `__metadata__` (repeatable), over the
    /// run's `export.metadata`.
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
}

fn parse_export_dtype(s: &str) -> Result<crate::config::ExportDtype, String> {
    crate::config::ExportDtype::parse(s).ok_or_else(|| format!("unknown dtype `{s}`; expected float32, bfloat16 or float16"))
}

/// How to load a model directory.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A kiln bundle, a Hugging Face directory, or a GGUF file of a Llama or Qwen2 model (read
    /// dequantized).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Rename stored tensors: `PATTERN=REPLACEMENT` (regex, `$1` for groups; repeatable).
    #[arg(long = "key-map", value_name = "PATTERN=REPLACEMENT")]
    pub key_map: Vec<String>,
    /// Keep a fresh initialisation for tensors the files lack instead of failing.
    #[arg(long)]
    pub allow_partial: bool,
    /// Backend to run on.
    #[arg(long, value_parser = parse_backend, default_value = "flex")]
    pub backend: BackendKind,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the K most likely tokens only.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text to score.
    #[arg(long, value_name = "FILE")]
    pub text_file: PathBuf,
    /// Tokens of context per window; defaults to the training sequence length of a kiln
    /// bundle, else the model's maximum.
    #[arg(long)]
    pub seq_len: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .safetensors file (checkpoint weights, optimizer state, or any other), a bundle or
    /// Hugging Face model directory, or its model.safetensors.index.json.
    pub file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    /// A checkpoint directory (e.g. outputs/checkpoints) or a run's output directory.
    pub dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The run's TOML config: its `[data]` section (and `model.init_from`, whose tokenizer a
    /// fine-tune's data is tokenized with).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Override one config key, e.g. `--set data.cache_dir="/scratch/cache"` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run's TOML config (see README.md for every key).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Continue from a checkpoint (any of its files, e.g.
    /// outputs/checkpoints/checkpoint_latest.safetensors).
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Backend to train on; overrides `training.backend`.
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<BackendKind>,
    /// Output directory; overrides `output_dir`.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Override one config key, e.g. `--set training.max_steps=200` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Train data-parallel in N processes on this machine, started by Open MPI's `mpirun`
    /// (across machines, run `mpirun`/`srun` yourself; README: Distributed training).
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
}

fn parse_backend(s: &str) -> Result<BackendKind, String> {
    BackendKind::parse(s).ok_or_else(|| {
        format!("unknown backend `{s}`; expected one of flex, ndarray, wgpu, cuda")
    })
}

/// Entry point of the binary: runs the command and turns errors into one message and a
/// non-zero exit status.
pub fn main() -> ExitCode {
    crate::backend::tune_process();
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train(args),
        Command::Prepare(args) => prepare(args),
        Command::Export(args) => export(args),
        Command::Generate(args) => generate(args),
        Command::Eval(args) => eval(args),
        Command::Inspect(args) => crate::inspect::inspect(&args.file, args.json),
        Command::Checkpoints(args) => crate::inspect::checkpoints(&args.dir, args.json),
        Command::Convert(args) => crate::convert::convert(&args.input, &args.output),
        Command::Quantize(args) => quantize(args),
        Command::Merge(args) => merge(args),
    }
}

fn prepare(args: PrepareArgs) -> Result<()> {
    use crate::prepare::{TokenizerChoice, prepare};
    let config = Config::load(&args.config, &args.set)?;
    let choice = match &config.model.init_from {
        Some(dir) => match crate::tokenizer::KilnTokenizer::from_dir(dir).with_context(|| format!("model.init_from = {}", dir.display()))? {
            Some(tokenizer) => TokenizerChoice::Given(tokenizer),
            None => anyhow::bail!("model.init_from = {} has no tokenizer.json to tokenize the data with", dir.display()),
        },
        None => TokenizerChoice::from_config(&config.data)?,
    };
    let prepared = prepare(&config.data, &choice)?;
    let manifest = crate::dataset::Manifest::read(&prepared.dir)?;
    eprintln!(
        "kiln: {} {} tokens of {} documents from {} sources in {} shards ({}){}",
        if prepared.tokenized { "prepared" } else { "already prepared:" },
        manifest.num_tokens,
        manifest.num_documents,
        manifest.sources.len(),
        manifest.shards.len(),
        serde_json::to_value(manifest.dtype)?.as_str().unwrap_or_default(),
        if manifest.skipped.records > 0 { format!(", {} bad records skipped", manifest.skipped.records) } else { String::new() }
    );
    println!("{}", prepared.dir.display());
    Ok(())
}

fn train(args: TrainArgs) -> Result<()> {
    if let Some(n) = args.nproc {
        return launch_ranks(n);
    }
    let world = Arc::new(World::from_launcher()?);
    match train_rank(&args, world.clone()) {
        Ok(()) => Ok(()),
        // A rank that fails alone would leave the others waiting in a collective.
        Err(err) if world.size() > 1 => {
            eprintln!("error: rank {} of {}: {err:#}", world.rank(), world.size());
            world.abort(1)
        }
        Err(err) => Err(err),
    }
}

/// `kiln train --nproc N`: the same command, without `--nproc`, as N ranks under `mpirun`.
fn launch_ranks(n: usize) -> Result<()> {
    if n == 0 {
        bail!("--nproc must be at least 1");
    }
    if !cfg!(feature = "mpi") {
        bail!("--nproc needs a kiln built with MPI: `cargo build --release --features mpi` (README: Distributed training)");
    }
    let exe = std::env::current_exe().context("cannot find the kiln executable")?;
    let mut rest = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--nproc" {
            args.next();
        } else if !a.starts_with("--nproc=") {
            rest.push(a);
        }
    }
    // Each rank's CPU backend gets its share of the cores unless told otherwise.
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        (cores / n).max(1).to_string()
    });
    let mut cmd = std::process::Command::new("mpirun");
    cmd.args(["-n", &n.to_string(), "--oversubscribe", "--bind-to", "none", "-x", "RAYON_NUM_THREADS"]);
    cmd.arg(&exe).args(&rest).env("RAYON_NUM_THREADS", threads);
    // Open MPI refuses root unless told, and containers often run as root.
    if unsafe { libc::geteuid() } == 0 {
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("--nproc starts its processes with Open MPI's `mpirun`, which is not installed (Debian: apt install openmpi-bin)")
        }
        Err(e) => return Err(e).context("cannot start mpirun"),
    };
    if !status.success() {
        bail!("the {n} training processes failed ({status}); see their messages above");
    }
    Ok(())
}

fn train_rank(args: &TrainArgs, world: Arc<World>) -> Result<()> {
    let leader = world.is_leader();
    let mut overrides = args.set.clone();
    if let Some(backend) = args.backend {
        overrides.push(format!("training.backend=\"{}\"", backend.name()));
    }
    if let Some(dir) = &args.output_dir {
        overrides.push(format!("output_dir={}", toml_string(&dir.display().to_string())));
    }
    let config = Config::load(&args.config, &overrides)?;
    let mut learner = Learner::new_in(config, args.resume.as_deref(), world.clone())?;
    learner.progress = leader;
    install_signal_handler()?;
    if !leader {
        learner.fit()?;
        return Ok(());
    }
    if args.resume.is_some() {
        eprintln!(
            "kiln: resuming at step {} (epoch {}, batch {} of it)",
            learner.step,
            learner.epoch(),
            learner.data_position().batch_in_epoch
        );
    }
    let processes = match world.size() {
        1 => String::new(),
        n => format!(" x {n} processes"),
    };
    eprintln!(
        "kiln: training {} parameters on {}{processes} ({} tokens/step, vocab {}) -> {}",
        learner.arch.num_params(),
        learner.config.training.backend.name(),
        learner.config.training.global_batch() * world.size() * learner.config.data.seq_len,
        learner.arch.vocab_size(),
        learner.config.output_dir.display()
    );
    let summary = learner.fit()?;
    for dir in &learner.exported {
        eprintln!("kiln: exported {}", dir.display());
    }
    let why = match summary.stop_reason {
        StopReason::MaxSteps => "reached training.max_steps",
        StopReason::Epochs => "completed training.epochs",
        StopReason::EarlyStopping => "early stopping",
        StopReason::Interrupted => "interrupted; checkpoint_latest saved",
    };
    eprintln!(
        "kiln: done after {} steps in {:.1}s ({why}); final val_loss {}, best {}",
        summary.steps,
        summary.wall_seconds,
        summary
            .final_val_loss
            .map_or("n/a".into(), |v| format!("{v:.4}")),
        summary
            .best
            .map_or("n/a".into(), |b| format!("{:.4} at step {}", b.value, b.step)),
    );
    Ok(())
}

fn export(args: ExportArgs) -> Result<()> {
    let ck = crate::checkpoint::load(&args.checkpoint)?;
    let config = &ck.sidecar.config;
    let version = args.version.unwrap_or_else(|| config.export.version.clone());
    let max_shard = crate::export::parse_size(
        args.max_shard_size.as_deref().unwrap_or(&config.export.max_shard_size),
    )?;
    let out = match args.out {
        Some(out) => out,
        None => {
            // <output_dir>/checkpoints/<ckpt> -> <output_dir>/models/inference/...
            let run_dir = crate::checkpoint::storage::parent(&ck.paths.weights)
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            run_dir
                .join("models")
                .join("inference")
                .join(format!("model_{version}_step{}", ck.sidecar.global_step))
        }
    };
    let dtype = args.dtype.unwrap_or(config.export.dtype);
    let metadata = crate::export::metadata_with(&config.export.metadata, &args.metadata)?;
    let report = crate::export::export_checkpoint(&ck, &out, max_shard, dtype, &metadata)?;
    println!(
        "exported {} (step {}) to {} ({} weight file{})",
        ck.sidecar.name,
        ck.sidecar.global_step,
        report.dir.display(),
        report.shards,
        if report.shards == 1 { "" } else { "s" }
    );
    Ok(())
}

fn merge(args: MergeArgs) -> Result<()> {
    let max_shard = crate::export::parse_size(&args.max_shard_size)?;
    let recipe = crate::merge::Recipe::read(&args.config)?;
    let report = crate::merge::Merger::new(recipe, args.seed)?.write(&args.out, max_shard)?;
    println!("merged into {} ({} weight file{})", report.dir.display(), report.shards, if report.shards == 1 { "" } else { "s" });
    Ok(())
}

fn quantize(args: QuantizeArgs) -> Result<()> {
    let report = crate::quantize::quantize(&args.model, args.ty, &args.out)?;
    if !report.fallbacks.is_empty() {
        eprintln!("kiln: rows not divisible into 32-value blocks, kept as F16: {}", report.fallbacks.join(", "));
    }
    println!("wrote {} ({} tensors, {})", args.out.display(), report.tensors, crate::inspect::human_bytes(report.bytes));
    Ok(())
}

fn load_model(args: &ModelArgs) -> Result<(crate::pretrained::Pretrained, burn::tensor::Device)> {
    let device = crate::backend::device(args.backend)?;
    let mut options = crate::pretrained::LoadOptions::with_rules(&args.key_map)?;
    options.allow_partial = args.allow_partial;
    // A GGUF file is read as the Hugging Face directory it describes, dequantized.
    let p = if args.model.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let dir = std::env::temp_dir().join(format!("kiln-gguf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = crate::gguf_model::GgufModel::open(&args.model).and_then(|m| m.write_dir(&dir)).and_then(|()| crate::pretrained::load(&dir, &device, &options));
        let _ = std::fs::remove_dir_all(&dir);
        loaded?
    } else {
        crate::pretrained::load(&args.model, &device, &options)?
    };
    if !p.report.reindexed_layers.is_empty() {
        let pairs: Vec<String> = p.report.reindexed_layers.iter().map(|(a, b)| format!("{a} as {b}")).collect();
        eprintln!("kiln: layer indices have gaps; loaded layers {} in order", pairs.join(", "));
    }
    for (stored, used) in &p.report.renamed {
        eprintln!("kiln: loaded `{stored}` as `{used}`");
    }
    if !p.report.unexpected.is_empty() {
        eprintln!("kiln: unused tensors in {}: {}", args.model.display(), p.report.unexpected.join(", "));
    }
    if !p.report.missing.is_empty() {
        eprintln!("kiln: missing tensors kept at their initialisation: {}", p.report.missing.join(", "));
    }
    Ok((p, device))
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (p, device) = load_model(&args.model)?;
    let tokenizer = p.tokenizer.as_ref().ok_or_else(|| {
        anyhow::anyhow!("{} has no tokenizer.json, so text cannot be encoded", args.model.model.display())
    })?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let options = crate::generate::SamplingOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
        eos_token_ids: tokenizer.special_tokens().eos_token_ids.clone(),
    };
    let ids = crate::generate::generate_ids(&p.model, &prompt, &options, &device)?;
    println!("{}", tokenizer.decode(&ids)?);
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let (p, device) = load_model(&args.model)?;
    let tokenizer = p.tokenizer.as_ref().ok_or_else(|| {
        anyhow::anyhow!("{} has no tokenizer.json, so text cannot be encoded", args.model.model.display())
    })?;
    let text = crate::data::read_text(&args.text_file, "--text-file ")?;
    let ids = tokenizer.encode(&text)?;
    let trained_seq_len = p
        .training_metadata
        .as_ref()
        .and_then(|m| m["hyperparameters"]["data"]["seq_len"].as_u64())
        .map(|v| v as usize);
    let window = args.seq_len.or(trained_seq_len).unwrap_or(p.arch.max_context());
    let score = crate::evaluate::score(&p.model, &ids, window, args.batch_size, &device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({
            "model": args.model.model.display().to_string(),
            "text_file": args.text_file.display().to_string(),
            "cross_entropy": score.cross_entropy,
            "perplexity": score.perplexity,
            "tokens": score.tokens,
            "window": window,
        }))?);
    } else {
        println!("cross_entropy {:.4} nats/token", score.cross_entropy);
        println!("perplexity    {:.4}", score.perplexity);
        println!("tokens        {}", score.tokens);
    }
    Ok(())
}

/// A TOML basic string literal.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
