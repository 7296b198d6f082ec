//! Training from Rust code instead of the CLI: load a config, adjust it, run the `Learner`.
//!
//! cargo run --release --example train_tiny -- [MAX_STEPS]

use anyhow::Result;
use kiln::config::Config;
use kiln::train::Learner;

fn main() -> Result<()> {
    let max_steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200);
    let overrides = vec![
        format!("training.max_steps={max_steps}"),
        "training.eval_every_steps=50".to_string(),
        "output_dir=\"outputs/example\"".to_string(),
    ];
    let config = Config::load("configs/tiny.toml".as_ref(), &overrides)?;
    let mut learner = Learner::new(config)?;
    learner.progress = true;
    println!("before training: val_loss {:.4}", learner.evaluate());
    let summary = learner.fit()?;
    println!(
        "after {} steps: val_loss {:.4} (metrics and loss curve in {})",
        summary.steps,
        summary.final_val_loss.unwrap_or(f64::NAN),
        summary.output_dir.display()
    );
    Ok(())
}
