//! What to keep: which checkpoint names a save writes, and which step checkpoints to delete.
//!
//! Pure functions of the run's progress and the checkpoints on disk; `storage` decides how
//! files are written and `manager` sequences the two.

use serde::{Deserialize, Serialize};

use crate::config::Metric;

/// Whether a larger or a smaller metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Min,
    Max,
}

impl Mode {
    /// True when `candidate` is strictly better than `incumbent`.
    pub fn improves(self, candidate: f64, incumbent: f64) -> bool {
        match self {
            Mode::Min => candidate < incumbent,
            Mode::Max => candidate > incumbent,
        }
    }
}

/// The kinds of checkpoint, each with its own name and retention rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Kind {
    /// The most recent state; overwritten by every save, never deleted.
    Latest,
    /// The best state by the tracked metric; overwritten when it improves, never deleted.
    Best,
    /// Every `save_every_epochs` epochs; never deleted automatically.
    Epoch { epoch: usize },
    /// Every `save_every_steps` steps; only the top `keep_top_k` by the metric are kept.
    Step { step: usize },
}

impl Kind {
    /// The checkpoint's name (its files are `<name>.safetensors`, `<name>.optim.safetensors`,
    /// `<name>.meta.json`).
    pub fn name(&self, metric: Metric) -> String {
        match self {
            Kind::Latest => "checkpoint_latest".to_string(),
            Kind::Best => format!("checkpoint_best_{metric}"),
            Kind::Epoch { epoch } => format!("checkpoint_epoch_{epoch}"),
            Kind::Step { step } => format!("checkpoint_step_{step}"),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Kind::Latest => "latest",
            Kind::Best => "best",
            Kind::Epoch { .. } => "epoch",
            Kind::Step { .. } => "step",
        }
    }
}

/// The `[checkpoint]` policy knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// 0 disables step checkpoints.
    pub save_every_steps: usize,
    /// 0 disables epoch checkpoints.
    pub save_every_epochs: usize,
    pub keep_top_k: usize,
    pub metric: Metric,
    pub mode: Mode,
}

/// What just happened in the run that may call for a save.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: usize,
    /// Set when the step just completed an epoch (1-based count of completed epochs).
    pub epoch_completed: Option<usize>,
    /// The tracked metric improved on the best so far at this step.
    pub improved: bool,
    /// The run is ending (finished, stopped early, or interrupted): `latest` must be saved.
    pub ending: bool,
}

impl Policy {
    /// The checkpoints to write now; empty when no save is due. Any save also refreshes
    /// `latest`, so that `latest` is always the newest state on disk.
    pub fn kinds_to_write(&self, p: Progress) -> Vec<Kind> {
        let mut kinds = Vec::new();
        if p.improved {
            kinds.push(Kind::Best);
        }
        if let Some(epoch) = p.epoch_completed
            && self.save_every_epochs > 0
            && epoch % self.save_every_epochs == 0
        {
            kinds.push(Kind::Epoch { epoch });
        }
        if self.save_every_steps > 0 && p.step > 0 && p.step % self.save_every_steps == 0 {
            kinds.push(Kind::Step { step: p.step });
        }
        if !kinds.is_empty() || p.ending {
            kinds.insert(0, Kind::Latest);
        }
        kinds
    }

    /// Given the step checkpoints on disk with their metric values, the steps to delete so that
    /// only the best `keep_top_k` remain. A checkpoint without a metric ranks below every one
    /// with a metric; ties keep the newer checkpoint.
    pub fn step_checkpoints_to_delete(&self, existing: &[(usize, Option<f64>)]) -> Vec<usize> {
        let mut ranked: Vec<(usize, Option<f64>)> = existing.to_vec();
        ranked.sort_by(|a, b| {
            let by_metric = match (a.1, b.1) {
                (Some(x), Some(y)) => {
                    if self.mode.improves(x, y) {
                        std::cmp::Ordering::Less
                    } else if self.mode.improves(y, x) {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Equal
                    }
                }
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            by_metric.then(b.0.cmp(&a.0))
        });
        let mut doomed: Vec<usize> = ranked.iter().skip(self.keep_top_k).map(|c| c.0).collect();
        doomed.sort_unstable();
        doomed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            save_every_steps: 100,
            save_every_epochs: 2,
            keep_top_k: 2,
            metric: Metric::ValLoss,
            mode: Mode::Min,
        }
    }

    #[test]
    fn saves_are_due_on_schedule_and_always_refresh_latest() {
        let p = policy();
        assert!(p.kinds_to_write(Progress { step: 50, ..Default::default() }).is_empty());
        assert_eq!(
            p.kinds_to_write(Progress { step: 200, ..Default::default() }),
            [Kind::Latest, Kind::Step { step: 200 }]
        );
        assert_eq!(
            p.kinds_to_write(Progress {
                step: 250,
                epoch_completed: Some(4),
                improved: true,
                ending: false
            }),
            [Kind::Latest, Kind::Best, Kind::Epoch { epoch: 4 }]
        );
        assert!(p.kinds_to_write(Progress { step: 251, epoch_completed: Some(3), ..Default::default() }).is_empty());
        assert_eq!(
            p.kinds_to_write(Progress { step: 7, ending: true, ..Default::default() }),
            [Kind::Latest]
        );
    }

    #[test]
    fn top_k_keeps_the_best_metrics_and_ranks_missing_metrics_last() {
        let p = policy();
        let existing = [(100, Some(2.0)), (200, Some(1.5)), (300, None), (400, Some(1.7)), (500, Some(1.5))];
        assert_eq!(p.step_checkpoints_to_delete(&existing), [100, 300, 400]);
        let max = Policy { mode: Mode::Max, ..policy() };
        assert_eq!(max.step_checkpoints_to_delete(&existing), [200, 300, 500]);
        assert!(p.step_checkpoints_to_delete(&existing[..2]).is_empty());
    }

    #[test]
    fn names_follow_the_spec() {
        assert_eq!(Kind::Latest.name(Metric::ValLoss), "checkpoint_latest");
        assert_eq!(Kind::Best.name(Metric::ValLoss), "checkpoint_best_val_loss");
        assert_eq!(Kind::Best.name(Metric::TrainLoss), "checkpoint_best_train_loss");
        assert_eq!(Kind::Epoch { epoch: 5 }.name(Metric::ValLoss), "checkpoint_epoch_5");
        assert_eq!(Kind::Step { step: 1000 }.name(Metric::ValLoss), "checkpoint_step_1000");
    }
}
