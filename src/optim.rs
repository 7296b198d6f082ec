//! AdamW (decoupled weight decay, PyTorch semantics) with global-norm gradient clipping.
//!
//! Moments are keyed by parameter *name* (the Hugging Face tensor name), never by Burn's
//! `ParamId`: ids are regenerated whenever weights are loaded, and state keyed by them would be
//! silently orphaned on resume. Weight decay applies to matrices and embeddings only; norm
//! weights are not decayed (as in nanoGPT and most Llama recipes).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use crate::fused::{self, kernels::AdamWStep};

/// Hyperparameters; `lr` is passed to each step by the schedule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments of one parameter, flattened to 1-D (the parameter's own shape is
/// kept in `shape` for saving).
#[derive(Debug, Clone)]
pub struct Moments {
    pub shape: Vec<usize>,
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far (the bias-correction time step).
    pub step: u64,
    pub moments: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: BTreeMap::new(),
        }
    }

    /// Applies one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, mut grads: GradientsParams) -> M {
        self.step += 1;
        let mut mapper = AdamWMapper {
            optim: self,
            grads: &mut grads,
            lr,
        };
        crate::params::map_named(module, &mut mapper)
    }
}

struct AdamWMapper<'a> {
    optim: &'a mut AdamW,
    grads: &'a mut GradientsParams,
    lr: f64,
}

impl crate::params::NamedMapper for AdamWMapper<'_> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let shape = tensor.dims();
        let numel: usize = shape.iter().product();

        let c = self.optim.config;
        let t = self.optim.step as i32;
        let theta = tensor.inner().reshape([numel]);
        let grad = grad.reshape([numel]);
        let moments = self.optim.moments.remove(name);
        // PyTorch: p *= 1 - lr*wd; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        let step = AdamWStep {
            lr: self.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: if D >= 2 { c.weight_decay } else { 0.0 },
            bias_correction1: 1.0 - c.beta1.powi(t),
            bias_correction2_sqrt: (1.0 - c.beta2.powi(t)).sqrt(),
        };
        let (theta, exp_avg, exp_avg_sq) = if fused::available(&theta.device(), theta.dtype()) {
            let (exp_avg, exp_avg_sq) = match moments {
                Some(m) => (m.exp_avg, m.exp_avg_sq),
                None => (grad.zeros_like(), grad.zeros_like()),
            };
            fused::adamw(theta, grad, exp_avg, exp_avg_sq, step)
        } else {
            composed_adamw(theta, grad, moments, step)
        };
        let theta = theta.reshape(shape);

        self.optim.moments.insert(
            name.to_string(),
            Moments {
                shape: shape.to_vec(),
                exp_avg,
                exp_avg_sq,
            },
        );
        let mut theta = Tensor::from_inner(theta);
        if require_grad {
            theta = theta.require_grad();
        }
        Param::from_mapped_value(id, theta, mapper)
    }
}

/// AdamW from Burn tensor ops, for backends without the fused kernel; returns the new
/// `(param, exp_avg, exp_avg_sq)`.
fn composed_adamw(theta: Tensor<1>, grad: Tensor<1>, moments: Option<Moments>, step: AdamWStep) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (exp_avg, exp_avg_sq) = match moments {
        Some(m) => (
            m.exp_avg.mul_scalar(step.beta1) + grad.clone().mul_scalar(1.0 - step.beta1),
            m.exp_avg_sq.mul_scalar(step.beta2) + grad.square().mul_scalar(1.0 - step.beta2),
        ),
        None => (
            grad.clone().mul_scalar(1.0 - step.beta1),
            grad.square().mul_scalar(1.0 - step.beta2),
        ),
    };
    let theta = if step.weight_decay > 0.0 {
        theta.mul_scalar(1.0 - step.lr * step.weight_decay)
    } else {
        theta
    };
    let denom = exp_avg_sq
        .clone()
        .sqrt()
        .div_scalar(step.bias_correction2_sqrt)
        .add_scalar(step.eps);
    let update = exp_avg.clone().div(denom).mul_scalar(step.lr / step.bias_correction1);
    (theta - update, exp_avg, exp_avg_sq)
}

/// Scales all gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let norm = grad_norm(module, grads);
    if max_norm > 0.0 && norm > max_norm {
        scale_grads(module, grads, max_norm / (norm + 1e-6));
    }
    norm
}

/// The global L2 norm of `grads` (inf or NaN when any gradient is).
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut squares = SquaredNorm { grads, total: None };
    module.visit(&mut squares);
    match squares.total {
        Some(total) => (total.into_scalar::<f32>() as f64).sqrt(),
        None => 0.0,
    }
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    module.visit(&mut Scale { grads, scale: factor });
}

/// Adds `other`'s gradients into `acc`, parameter by parameter (gradient accumulation).
pub fn add_grads<M: Module>(module: &M, acc: &mut GradientsParams, mut other: GradientsParams) {
    module.visit(&mut Accumulate { acc, other: &mut other });
}

/// Hands every gradient, laid end to end in one f32 buffer in the module's parameter order, to
/// `f` (e.g. an all-reduce between data-parallel ranks, one message per step), then puts the
/// buffer's values back as the gradients.
pub fn map_flat_grads<M: Module>(module: &M, grads: &mut GradientsParams, f: impl FnOnce(&mut [f32])) {
    let mut gather = Gather { grads, taken: Vec::new(), flat: Vec::new() };
    module.visit(&mut gather);
    let Gather { grads, taken, mut flat } = gather;
    f(&mut flat);
    let mut offset = 0;
    for (id, shape, device) in taken {
        let n = shape.iter().product::<usize>();
        let data = TensorData::new(flat[offset..offset + n].to_vec(), shape.clone());
        offset += n;
        match shape.len() {
            1 => grads.register(id, Tensor::<1>::from_data(data, &device)),
            2 => grads.register(id, Tensor::<2>::from_data(data, &device)),
            3 => grads.register(id, Tensor::<3>::from_data(data, &device)),
            4 => grads.register(id, Tensor::<4>::from_data(data, &device)),
            d => unreachable!("no kiln parameter has {d} dimensions"),
        }
    }
}

struct Gather<'a> {
    grads: &'a mut GradientsParams,
    taken: Vec<(ParamId, Vec<usize>, Device)>,
    flat: Vec<f32>,
}

impl ModuleVisitor for Gather<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            let (device, shape) = (g.device(), g.dims().to_vec());
            let values = g.into_data().convert::<f32>().try_into_vec::<f32>().expect("converted to f32");
            self.taken.push((param.id, shape, device));
            self.flat.extend_from_slice(&values);
        }
    }
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    scale: f64,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.scale));
        }
    }
}

struct Accumulate<'a> {
    acc: &'a mut GradientsParams,
    other: &'a mut GradientsParams,
}

impl ModuleVisitor for Accumulate<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.other.remove::<D>(param.id) {
            let sum = match self.acc.remove::<D>(param.id) {
                Some(a) => a + g,
                None => g,
            };
            self.acc.register(param.id, sum);
        }
    }
}
