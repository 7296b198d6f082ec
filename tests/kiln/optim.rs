//! AdamW and clipping against an independent f64 implementation of PyTorch's formulas.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use kiln::optim::{AdamW, AdamWConfig, clip_grad_norm};

#[derive(Module, Debug)]
struct Toy {
    matrix: Param<Tensor<2>>,
    vector: Param<Tensor<1>>,
}

fn toy(device: &Device) -> Toy {
    Toy {
        matrix: Param::from_data(TensorData::new(vec![0.5f32, -1.0, 2.0, 0.25], [2, 2]), device),
        vector: Param::from_data(TensorData::new(vec![1.0f32, -3.0], [2]), device),
    }
}

/// Gradients of `sum(c_m * matrix) + sum(c_v * vector^2)` for step-dependent constants.
fn grads(model: &Toy, step: usize) -> GradientsParams {
    let device = model.matrix.val().device();
    let k = step as f32 + 1.0;
    let cm = Tensor::<2>::from_data(TensorData::new(vec![k, -2.0, 0.5 * k, 3.0], [2, 2]), &device);
    let cv = Tensor::<1>::from_data(TensorData::new(vec![0.3f32, -k], [2]), &device);
    let loss = (model.matrix.val() * cm).sum() + (model.vector.val().square() * cv).sum();
    GradientsParams::from_grads(loss.backward(), model)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap().iter().map(|&v| v as f64).collect()
}

/// PyTorch `torch.optim.AdamW` for one tensor, in f64.
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl Reference {
    fn step(&mut self, g: &[f64], lr: f64, t: i32, c: &AdamWConfig, decay: bool) {
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for i in 0..self.p.len() {
            if decay {
                self.p[i] *= 1.0 - lr * c.weight_decay;
            }
            self.m[i] = c.beta1 * self.m[i] + (1.0 - c.beta1) * g[i];
            self.v[i] = c.beta2 * self.v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let denom = self.v[i].sqrt() / bc2.sqrt() + c.eps;
            self.p[i] -= lr / bc1 * self.m[i] / denom;
        }
    }
}

/// The fused AdamW kernel (on Flex and on ndarray) and the composed tensor ops other backends
/// run: all against PyTorch.
#[test]
#[allow(deprecated)]
fn adamw_matches_pytorch_semantics_and_keys_state_by_name() {
    adamw_against_reference(&Device::flex().autodiff());
    adamw_against_reference(&Device::ndarray().autodiff());
    kiln::fused::composed(|| adamw_against_reference(&Device::flex().autodiff()));
}

fn adamw_against_reference(device: &Device) {
    let device = device.clone();
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut optim = AdamW::new(config);
    let mut model = toy(&device);
    let n = |v: Vec<f64>| Reference { m: vec![0.0; v.len()], v: vec![0.0; v.len()], p: v };
    let mut ref_m = n(values(model.matrix.val()));
    let mut ref_v = n(values(model.vector.val()));
    for step in 0..6 {
        let g = grads(&model, step);
        let gm = values(g.get::<2>(model.matrix.id).unwrap());
        let gv = values(g.get::<1>(model.vector.id).unwrap());
        let lr = 0.01 * (step + 1) as f64;
        model = optim.step(lr, model, g);
        ref_m.step(&gm, lr, step as i32 + 1, &config, true);
        ref_v.step(&gv, lr, step as i32 + 1, &config, false); // 1-D: no weight decay
    }
    for (got, want) in [(values(model.matrix.val()), &ref_m.p), (values(model.vector.val()), &ref_v.p)] {
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((g - w).abs() < 1e-5, "got {g}, PyTorch formula gives {w}");
        }
    }
    assert_eq!(optim.step, 6);
    let names: Vec<&str> = optim.moments.keys().map(String::as_str).collect();
    assert_eq!(names, ["matrix", "vector"]);
    let m = &optim.moments["matrix"];
    assert_eq!(m.shape, vec![2, 2]);
    for (g, w) in values(m.exp_avg_sq.clone()).iter().zip(&ref_m.v) {
        assert!((g - w).abs() < 1e-6 * w.abs().max(1.0));
    }
    // Parameters still take part in autodiff after the update.
    assert!(model.matrix.val().is_require_grad());
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let device = Device::flex().autodiff();
    let model = toy(&device);
    let mut g = grads(&model, 2);
    let all: Vec<f64> = [values(g.get::<2>(model.matrix.id).unwrap()), values(g.get::<1>(model.vector.id).unwrap())].concat();
    let norm = all.iter().map(|v| v * v).sum::<f64>().sqrt();
    let reported = clip_grad_norm(&model, &mut g, 1.0);
    assert!((reported - norm).abs() < 1e-4 * norm);
    let clipped: Vec<f64> = [values(g.get::<2>(model.matrix.id).unwrap()), values(g.get::<1>(model.vector.id).unwrap())].concat();
    let new_norm = clipped.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!((new_norm - 1.0).abs() < 1e-4, "clipped norm {new_norm}");
    for (a, b) in all.iter().zip(&clipped) {
        assert!((a / norm - b).abs() < 1e-5, "direction changed");
    }
    // Under the limit, nothing changes.
    let mut g = grads(&model, 2);
    clip_grad_norm(&model, &mut g, 1e6);
    assert_eq!(values(g.get::<2>(model.matrix.id).unwrap()), all[..4]);
}
