//! Runs training steps of a benchmark shape with nothing else in the process, for profilers.
//!
//!     cargo build --release --features wgpu --example profile_step
//!     RAYON_NUM_THREADS=1 valgrind --tool=callgrind target/release/examples/profile_step tiny flex 3
//!     perf record -g target/release/examples/profile_step small flex 10
//!
//! Arguments: SHAPE (tiny | small), BACKEND (flex | ndarray), STEPS, and optionally VOCAB: a
//! byte-level BPE vocabulary of that size trained on the corpus instead of its characters (the
//! size real tokenizers give the output layer and the loss). Prints the median time of the
//! forward pass (loss), the backward pass and the optimizer step after one warm-up step. (With
//! the fused kernels the output layer's gradients are computed with the loss, so they count in
//! the forward pass.)

use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::GradientsParams;
use kiln::config::Config;
use kiln::model::LanguageModel;
use kiln::train::Learner;

fn main() -> Result<()> {
    kiln::backend::tune_process(); // as the kiln binary does
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let (hidden, layers, heads, intermediate, seq_len) = match arg(0, "small").as_str() {
        "tiny" => (128, 4, 4, 384, 64),
        "small" => (384, 6, 6, 1024, 128),
        other => bail!("unknown shape {other:?} (tiny | small)"),
    };
    let backend = arg(1, "flex");
    let steps: usize = arg(2, "5").parse()?;
    let tokenizer = match args.get(3) {
        Some(vocab) => format!("tokenizer = \"bpe\"\nvocab_size = {}\n", vocab.parse::<usize>()?),
        None => String::new(),
    };
    let out = tempfile::tempdir()?;
    let text = format!(
        "output_dir = {:?}\n[model]\nhidden_size = {hidden}\nnum_layers = {layers}\nnum_heads = {heads}\n\
         num_kv_heads = {heads}\nintermediate_size = {intermediate}\nmax_position_embeddings = 256\n\
         [data]\npath = \"data/shakespeare.txt\"\nseq_len = {seq_len}\n{tokenizer}[training]\nbackend = \"{backend}\"\n\
         batch_size = 16\nmax_steps = 100000\n[checkpoint]\nsave_every_steps = 0\nsave_every_epochs = 0\n",
        out.path()
    );
    let mut learner = Learner::new(Config::from_toml_str(&text, "profile config", &[])?)?;
    let (mut forward, mut backward, mut update) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..=steps {
        let batch = learner.loader.next_batch().expect("a long epoch");
        let (inputs, targets) = batch.to_tensors(&learner.device);
        let t0 = Instant::now();
        let loss = learner.model().train_loss(inputs, targets, step as u64);
        let _ = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), learner.model());
        let t2 = Instant::now();
        learner.apply_gradients(grads);
        let t3 = Instant::now();
        if step > 0 {
            forward.push((t1 - t0).as_secs_f64() * 1e3);
            backward.push((t2 - t1).as_secs_f64() * 1e3);
            update.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "forward {:.1} ms, backward {:.1} ms, optimizer {:.1} ms per step (median of {steps})",
        median(forward),
        median(backward),
        median(update)
    );
    Ok(())
}
