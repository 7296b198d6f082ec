//! Metric records: kept in memory as the run's history and appended to `metrics.jsonl`, one
//! JSON object per line with `step`, `epoch` and whichever values were measured at that step.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: usize,
    pub epoch: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// fp16 runs: the loss scale at the end of the window, and the steps it skipped for
    /// overflowing gradients (see `loss_scale`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss_scale: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped_steps: Option<u64>,
    /// Data-parallel runs: mean seconds per step spent summing the gradients over the ranks
    /// (the all-reduce, waiting for the slowest rank included).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub allreduce_seconds: Option<f64>,
}

/// Appends records to `metrics.jsonl` (flushed per line, so a crash loses at most the line
/// being written) and keeps them as the run's history.
pub struct MetricsLog {
    path: PathBuf,
    /// `None` for a log kept in memory only (a data-parallel rank other than 0).
    writer: Option<BufWriter<File>>,
    pub history: Vec<MetricRecord>,
}

impl MetricsLog {
    /// Starts a fresh log at `path`, replacing any earlier one.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create metrics log {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Some(BufWriter::new(file)),
            history: Vec::new(),
        })
    }

    /// A log that keeps `history` and what is appended in memory and writes no file.
    pub fn in_memory(history: Vec<MetricRecord>) -> Self {
        Self { path: PathBuf::new(), writer: None, history }
    }

    /// Continues a log with `history` (e.g. restored from a checkpoint): the file is rewritten
    /// to hold exactly that history, dropping lines a crashed run wrote after its checkpoint.
    pub fn resume(path: &Path, history: Vec<MetricRecord>) -> Result<Self> {
        let mut log = Self::create(path)?;
        for record in &history {
            log.write_line(record)?;
        }
        log.history = history;
        Ok(log)
    }

    pub fn append(&mut self, record: MetricRecord) -> Result<()> {
        self.write_line(&record)?;
        self.history.push(record);
        Ok(())
    }

    fn write_line(&mut self, record: &MetricRecord) -> Result<()> {
        let Some(writer) = &mut self.writer else {
            return Ok(());
        };
        let line = serde_json::to_string(record).expect("metric records always serialize");
        writeln!(writer, "{line}")
            .and_then(|_| writer.flush())
            .with_context(|| format!("cannot write to {}", self.path.display()))
    }
}

/// Reads a `metrics.jsonl` file.
pub fn read_jsonl(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a metrics record", path.display(), i + 1))
        })
        .collect()
}
