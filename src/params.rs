//! Parameters by Hugging Face name, in Hugging Face layout.
//!
//! A parameter's module path is its Hugging Face name (see `model`). The only mapping is the
//! layout of Linear weights, which Burn stores `[in, out]` and PyTorch `[out, in]`; each
//! architecture says which of its parameters those are ([`HfLayout`]), and they are transposed
//! on the way out and in.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

pub use crate::model::HfLayout;

/// Visits float parameters by name (their module path, i.e. their Hugging Face name).
pub trait NamedVisitor {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<D>>);
}

/// Maps float parameters by name.
pub trait NamedMapper {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>>;
}

/// Runs `visitor` over every float parameter of `module` with its name.
pub fn visit_named<M: Module, V: NamedVisitor>(module: &M, visitor: &mut V) {
    module.visit(&mut Paths {
        path: Vec::new(),
        inner: visitor,
    });
}

/// Runs `mapper` over every float parameter of `module` with its name.
pub fn map_named<M: Module, V: NamedMapper>(module: M, mapper: &mut V) -> M {
    module.map(&mut Paths {
        path: Vec::new(),
        inner: mapper,
    })
}

/// Tracks the module path around a named visitor or mapper. The variant of an enum module
/// (`CausalLm::Llama`) is not part of the name.
struct Paths<'a, V> {
    path: Vec<String>,
    inner: &'a mut V,
}

fn is_enum(container_type: &str) -> bool {
    container_type.starts_with("Enum:")
}

impl<V: NamedVisitor> ModuleVisitor for Paths<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !is_enum(container_type) {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !is_enum(container_type) {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.inner.visit(&self.path.join("."), param);
    }
}

impl<V: NamedMapper> burn::module::ModuleMapper for Paths<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !is_enum(container_type) {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !is_enum(container_type) {
            self.path.pop();
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        self.inner.map(&name, param)
    }
}

/// One parameter's values in Hugging Face layout (row-major f32).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// All parameters of `module`, in module order, copied to the host in Hugging Face layout.
pub fn named_tensors<M: Module + HfLayout>(module: &M) -> Vec<NamedTensor> {
    let mut collector = Collector {
        layout: module,
        shapes_only: false,
        out: Vec::new(),
    };
    visit_named(module, &mut collector);
    collector.out
}

/// Names and Hugging Face shapes of all float parameters, without reading their values.
pub fn named_shapes<M: Module + HfLayout>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut collector = Collector {
        layout: module,
        shapes_only: true,
        out: Vec::new(),
    };
    visit_named(module, &mut collector);
    collector.out.into_iter().map(|t| (t.name, t.shape)).collect()
}

struct Collector<'a> {
    layout: &'a dyn HfLayout,
    shapes_only: bool,
    out: Vec<NamedTensor>,
}

impl NamedVisitor for Collector<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<D>>) {
        let name = name.to_string();
        let tensor = param.val();
        let tensor: Tensor<D> = if self.layout.stored_transposed(&name, D) {
            tensor.swap_dims(0, 1)
        } else {
            tensor
        };
        let shape = tensor.dims().to_vec();
        let values = if self.shapes_only {
            Vec::new()
        } else {
            tensor
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("converted to f32 above")
        };
        self.out.push(NamedTensor {
            name,
            shape,
            values,
        });
    }
}

/// Where [`load_named`] gets each parameter: given the Hugging Face name and shape, the values
/// in Hugging Face layout, or an error message.
pub trait ParamSource {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String>;

    /// The values of a Linear weight (Hugging Face `[out, in]`, `hf_shape`) transposed to
    /// Burn's `[in, out]`. Sources that can transpose while they read override this.
    fn transposed_values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        let values = self.values(name, hf_shape)?;
        match *hf_shape {
            [rows, cols] if values.len() == rows * cols => Ok(transpose(&values, rows, cols)),
            _ => Err(format!("{name}: got {} values for shape {hf_shape:?}", values.len())),
        }
    }
}

impl<F: FnMut(&str, &[usize]) -> Result<Vec<f32>, String>> ParamSource for F {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self(name, hf_shape)
    }
}

/// Replaces every parameter of `module` with values from `source`, converting from Hugging Face
/// layout. Parameters keep their ids and whether they require gradients. All problems are
/// collected and reported together.
pub fn load_named<M: Module + HfLayout>(module: M, source: &mut dyn ParamSource) -> Result<M, Vec<String>> {
    let mut transposed = std::collections::BTreeSet::new();
    for (name, shape) in named_shapes(&module) {
        if module.stored_transposed(&name, shape.len()) {
            transposed.insert(name);
        }
    }
    let mut loader = Loader {
        source,
        transposed,
        errors: Vec::new(),
    };
    let module = map_named(module, &mut loader);
    if loader.errors.is_empty() {
        Ok(module)
    } else {
        Err(loader.errors)
    }
}

struct Loader<'a> {
    source: &'a mut dyn ParamSource,
    /// The parameters stored transposed (the module is being consumed, so asked up front).
    transposed: std::collections::BTreeSet<String>,
    errors: Vec<String>,
}

impl NamedMapper for Loader<'_> {
    fn map<const D: usize>(&mut self, name: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let burn_shape = tensor.dims();
        let transposed = self.transposed.contains(name);
        let mut hf_shape = burn_shape.to_vec();
        if transposed {
            hf_shape.swap(0, 1);
        }
        // Linear weights are transposed on the host so the parameter is contiguous, exactly as
        // a freshly initialised one: a strided weight could take another kernel path and round
        // differently.
        let values = if transposed {
            self.source.transposed_values(name, &hf_shape)
        } else {
            self.source.values(name, &hf_shape)
        };
        let values = match values {
            Ok(v) if v.len() == hf_shape.iter().product::<usize>() => v,
            Ok(v) => {
                self.errors.push(format!(
                    "{name}: got {} values for shape {hf_shape:?}",
                    v.len()
                ));
                return Param::from_mapped_value(id, tensor, mapper);
            }
            Err(e) => {
                self.errors.push(e);
                return Param::from_mapped_value(id, tensor, mapper);
            }
        };
        let require_grad = tensor.is_require_grad();
        let device = tensor.device();
        let data = burn::tensor::TensorData::new(values, burn_shape.to_vec());
        let loaded: Tensor<D> = Tensor::from_data(data, &device.clone().without_autodiff());
        let mut loaded = if device.is_autodiff() {
            Tensor::from_inner(loaded)
        } else {
            loaded
        };
        if require_grad {
            loaded = loaded.require_grad();
        }
        Param::from_mapped_value(id, loaded, mapper)
    }
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`. Each task fills 32 whole rows of the
/// output from a 32-wide column strip of the input, so both sides stay in cache (a naive loop
/// strides through memory on every store) and a large weight is split over the threads.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut out = vec![0.0; values.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(TILE * rows).enumerate().for_each(|(i, strip)| {
        let c0 = i * TILE;
        let width = strip.len() / rows;
        for r in 0..rows {
            let row = &values[r * cols + c0..r * cols + c0 + width];
            for (c, &v) in row.iter().enumerate() {
                strip[c * rows + r] = v;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn transpose_matches_the_definition() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (64, 64), (1, 100), (100, 1), (130, 1000)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&v, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], v[r * cols + c]);
                }
            }
            assert_eq!(super::transpose(&t, cols, rows), v);
        }
    }
}

/// A write-pending tensor in Hugging Face layout from a device tensor in Burn layout. The
/// handle is only cloned here; the copy off the device happens when the writer reads the
/// tensor's batch (on the checkpoint thread), so a snapshot is cheap for the training loop.
/// `transposed` says whether the tensor is (the state of) a Linear weight.
pub fn pending<const D: usize>(
    name: String,
    tensor: Tensor<D>,
    transposed: bool,
) -> crate::safetensors_io::PendingTensor {
    let tensor = tensor.without_autodiff();
    let transposed = transposed && D == 2;
    let mut shape = tensor.dims().to_vec();
    if transposed {
        shape.swap(0, 1);
    }
    crate::safetensors_io::PendingTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape,
        source: crate::safetensors_io::TensorSource::Device(Box::new(move |transaction| {
            let tensor = if transposed { tensor.swap_dims(0, 1) } else { tensor };
            transaction.register(tensor)
        })),
    }
}

/// Write-pending copies of all parameters of `module`, named as in Hugging Face.
pub fn pending_params<M: Module + HfLayout>(module: &M) -> Vec<crate::safetensors_io::PendingTensor> {
    struct Pending<'a>(&'a dyn HfLayout, Vec<crate::safetensors_io::PendingTensor>);
    impl NamedVisitor for Pending<'_> {
        fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<D>>) {
            let transposed = self.0.stored_transposed(name, D);
            self.1.push(pending(name.to_string(), param.val(), transposed));
        }
    }
    let mut v = Pending(module, Vec::new());
    visit_named(module, &mut v);
    v.1
}
