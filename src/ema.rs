//! An exponential moving average of the weights (`training.ema_decay`), kept beside training
//! and saved in checkpoints.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::params::{NamedVisitor, visit_named};

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
        visit_named(module, &mut Updater { ema: self });
    }
}

struct Updater<'a> {
    ema: &'a mut Ema,
}

impl NamedVisitor for Updater<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<D>>) {
        let value = param.val().without_autodiff();
        let shape = value.dims().to_vec();
        let flat = value.reshape([shape.iter().product::<usize>()]);
        let decay = self.ema.decay;
        let value = match self.ema.weights.remove(name) {
            Some(old) => old.value.mul_scalar(decay) + flat.mul_scalar(1.0 - decay),
            None => flat,
        };
        self.ema.weights.insert(name.to_string(), EmaTensor { shape, value });
    }
}
