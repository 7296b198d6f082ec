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

/// fp16 on wgpu, where the adapter computes in f16 (wgpu's `SHADER_F16`): 10 steps with loss
/// scaling follow fp32 on flex within 3% per logged loss. An adapter without it is refused,
/// naming the key, before anything is prepared. (bf16 never runs on wgpu: WGSL has no such type.)
#[test]
fn wgpu_fp16_follows_fp32_or_is_refused() {
    use burn::tensor::FloatDType;
    use kiln::config::Precision;
    use kiln::metrics::read_jsonl;
    use kiln::train::Learner;
    let dir = tempfile::tempdir().unwrap();
    let mut config = super::common::tiny_config(dir.path());
    config.training.backend = BackendKind::Wgpu;
    config.training.precision = Precision::Fp16;
    config.training.max_steps = 10;
    let device = kiln::backend::device(BackendKind::Wgpu).unwrap();
    if !device.supports_dtype(FloatDType::F16) {
        let err = format!("{:#}", Learner::new(config).err().expect("refused"));
        assert!(err.contains("training.precision") && err.contains("the wgpu backend cannot compute in fp16"), "{err}");
        return;
    }
    Learner::new(config.clone()).unwrap().fit().unwrap();
    let fp16: Vec<f64> = read_jsonl(&config.output_dir.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.train_loss.or(r.val_loss)).collect();
    let (fp32, _) = run(BackendKind::Flex, 10, 0.0);
    let fp32: Vec<f64> = fp32
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.get("train_loss").or_else(|| v.get("val_loss")).and_then(|x| x.as_f64())
        })
        .collect();
    assert_eq!(fp32.len(), fp16.len());
    for (f, h) in fp32.iter().zip(&fp16) {
        assert!((f - h).abs() <= 0.03 * f, "wgpu fp16 loss {h} against flex fp32 {f}");
    }
}
