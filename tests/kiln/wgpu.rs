//! The wgpu backend against the CPU backend. On machines without a GPU this runs on Mesa's
//! lavapipe (a Vulkan driver on the CPU): `.ci/run` installs it. A missing adapter fails the
//! test rather than skipping it.

use kiln::config::BackendKind;

use super::training::run;

/// GPU kernels sum in a different order than the CPU ones, so results agree to rounding, not
/// bit for bit. Over 10 AdamW steps from identical weights and batches, losses agree to 1e-3
/// relative and every weight to 2e-3 absolute (AdamW steps are ~lr = 3e-3 per element, so a
/// wrong kernel shows up far beyond this).
#[test]
fn wgpu_training_agrees_with_flex() {
    let (cpu_metrics, cpu_weights) = run(BackendKind::Flex, 10, 0.0);
    let (gpu_metrics, gpu_weights) = run(BackendKind::Wgpu, 10, 0.0);
    let losses = |m: &str| -> Vec<f64> {
        m.lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.get("train_loss").or_else(|| v.get("val_loss")).and_then(|x| x.as_f64())
            })
            .collect()
    };
    let (cpu, gpu) = (losses(&cpu_metrics), losses(&gpu_metrics));
    assert_eq!(cpu.len(), gpu.len());
    assert!(!cpu.is_empty());
    for (c, g) in cpu.iter().zip(&gpu) {
        assert!((c - g).abs() <= 1e-3 * c.abs(), "loss {c} on flex vs {g} on wgpu");
    }
    for (c, g) in cpu_weights.iter().zip(&gpu_weights) {
        assert_eq!(c.name, g.name);
        let diff = c.values.iter().zip(&g.values).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 2e-3, "{}: flex and wgpu weights differ by {diff}", c.name);
    }
}
