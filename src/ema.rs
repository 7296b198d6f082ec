//! An exponential moving average of the weights (`training.ema_decay`), kept beside training
//! and saved in checkpoints.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// One averaged parameter, flattened, with its Burn-layout shape.
#[derive(Debug, Clone)]
pub struct EmaTensor {
    pub shape: Vec<usize>,
    pub value: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    pub weights: BTreeMap<String, EmaTensor>,
}

impl Ema {
    pub fn new(decay: f64) -> Self {
        Self {
            decay,
            weights: BTreeMap::new(),
        }
    }

    /// `ema = decay * ema + (1 - decay) * weights`; the first update copies the weights.
    pub fn update<M: Module>(&mut self, module: &M) {
        let mut v = Updater {
            ema: self,
            path: Vec::new(),
        };
        module.visit(&mut v);
    }
}

struct Updater<'a> {
    ema: &'a mut Ema,
    path: Vec<String>,
}

impl ModuleVisitor for Updater<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let value = param.val().without_autodiff();
        let shape = value.dims().to_vec();
        let flat = value.reshape([shape.iter().product::<usize>()]);
        let decay = self.ema.decay;
        let value = match self.ema.weights.remove(&name) {
            Some(old) => old.value.mul_scalar(decay) + flat.mul_scalar(1.0 - decay),
            None => flat,
        };
        self.ema.weights.insert(name, EmaTensor { shape, value });
    }
}
