//! Picks the Burn device for a backend name. CPU backends are always compiled in; GPU backends
//! need their cargo feature, and asking for one that is missing is a clear error, not a panic.

use anyhow::Result;
use burn::tensor::Device;

use crate::config::BackendKind;

/// The (non-autodiff) device for `kind`.
#[allow(deprecated)] // ndarray is deprecated upstream in favour of flex, but kiln offers both.
pub fn device(kind: BackendKind) -> Result<Device> {
    match kind {
        BackendKind::Flex => Ok(Device::flex()),
        BackendKind::Ndarray => Ok(Device::ndarray()),
        BackendKind::Wgpu => wgpu_device(),
        BackendKind::Cuda => cuda_device(),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device> {
    let device = Device::wgpu(Default::default());
    probe(&device, "wgpu")?;
    Ok(device)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device> {
    anyhow::bail!(
        "this kiln was built without the `wgpu` backend; rebuild with `--features wgpu` \
         (e.g. `cargo run --release --features wgpu -- train ...`)"
    )
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    crate::cuda_check::check()?;
    let device = Device::cuda(0);
    probe(&device, "cuda")?;
    Ok(device)
}

/// GPU runtimes initialise lazily and panic when no adapter exists; run one tiny operation
/// here, with the panic caught and kept off the terminal, so that a missing GPU is an error.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn probe(device: &Device, name: &str) -> Result<()> {
    use burn::tensor::Tensor;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| Tensor::<1>::ones([4], device).sum().into_scalar::<f32>());
    std::panic::set_hook(hook);
    match result {
        Ok(v) if v == 4.0 => Ok(()),
        Ok(v) => anyhow::bail!("the {name} device computed 1+1+1+1 = {v}; refusing to train on it"),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown error");
            anyhow::bail!("no usable {name} device: {why}")
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    anyhow::bail!(
        "this kiln was built without the `cuda` backend; rebuild with `--features cuda` \
         (needs the NVIDIA driver and CUDA runtime libraries; see README.md, Backends)"
    )
}

/// Process-wide settings that every kiln entry point (the binary, the benchmark, the profiling
/// example) applies first thing in `main`, before anything else runs.
pub fn tune_process() {
    keep_freed_memory();
    #[cfg(feature = "cuda")]
    // SAFETY: this runs first thing in `main`, before any other thread exists.
    unsafe {
        crate::cuda_check::use_kiln_libdevice_if_needed();
    }
    join_thread_pool();
}

/// Makes the calling thread one of the workers of rayon's global pool (which keeps its usual
/// size: `RAYON_NUM_THREADS`, else one thread per core, this one included).
///
/// The CPU backends and the fused kernels run every op on that pool. Called from a thread
/// outside it, each op is handed to the pool while the caller sleeps until it is done: a
/// futex wake and a sleep per op, several percent of a small model's step on two cores, and a
/// third thread competing for two cores. As a worker, the training thread runs its share of
/// each op itself, as PyTorch's OpenMP threads do. Does nothing if the pool already exists.
fn join_thread_pool() {
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
}

/// Keeps freed heap memory in the process instead of handing it back to the kernel.
///
/// A training step allocates and frees the same multi-megabyte activation buffers every step.
/// glibc serves blocks over 128 KiB with fresh `mmap`s and trims the heap top on free, so each
/// step paid page faults and kernel zeroing for memory it had just released (about a tenth of
/// a step's CPU time in `perf`). With these settings the buffers are reused from the heap; the
/// cost is that resident memory stays at its peak, as in any long-running trainer.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; any value is valid to pass.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's largest allowed threshold
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
