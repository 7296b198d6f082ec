//! What Burn's cuda backend needs from the machine it runs on, checked before Burn touches it:
//! its runtime panics where something is missing, where kiln wants an error that says what.
//!
//! - The NVIDIA driver's `libcuda.so.1` and at least one device. Only a driver brings them.
//! - libdevice (`nvvm/libdevice/libdevice.10.bc`), CUDA's math library, which cubecl links into
//!   every kernel calling `exp`, `log`, `tanh`...: from `CUDA_PATH`, a CUDA toolkit in one of
//!   the places cubecl looks, or the copy of PyPI's `nvidia-cuda-nvcc-cu12` that
//!   `scripts/setup-cuda.sh` installs.
//!
//! NVRTC and `nvcc` are not needed: cubecl compiles kernels to PTX with the LLVM linked into
//! kiln, and the driver loads the PTX.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Where cubecl-llvm looks for a toolkit when `CUDA_PATH` is unset, in its order.
const TOOLKIT_ROOTS: [&str; 4] = ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda", "/usr"];

fn libdevice(root: &Path) -> PathBuf {
    root.join("nvvm/libdevice/libdevice.10.bc")
}

/// The toolkit root cubecl will use: `CUDA_PATH`, else the first root holding libdevice.
fn toolkit_root() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CUDA_PATH") {
        return Some(PathBuf::from(path));
    }
    TOOLKIT_ROOTS.iter().map(PathBuf::from).find(|root| root.join("nvvm/libdevice").is_dir())
}

/// Where `scripts/setup-cuda.sh` unpacks PyPI's `nvidia-cuda-nvcc-cu12`: its `cuda_nvcc`
/// folder is laid out as a toolkit root.
pub fn kiln_toolkit_root() -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))?;
    Some(data.join("kiln/cuda/nvidia/cuda_nvcc"))
}

/// Points cubecl at kiln's own libdevice when neither `CUDA_PATH` nor a toolkit provides one.
///
/// # Safety
/// Sets an environment variable: call it before any other thread exists (first thing in
/// `main`), as `std::env::set_var` requires.
pub unsafe fn use_kiln_libdevice_if_needed() {
    if toolkit_root().is_some() {
        return;
    }
    if let Some(root) = kiln_toolkit_root().filter(|root| libdevice(root).is_file()) {
        // SAFETY: the caller guarantees no other thread reads or writes the environment.
        unsafe { std::env::set_var("CUDA_PATH", root) };
    }
}

/// Fails, saying what is missing, unless the driver, a device and libdevice are all here.
pub fn check() -> Result<()> {
    let driver = Driver::open()?;
    driver.init()?;
    let devices = driver.device_count()?;
    if devices == 0 {
        bail!("no usable cuda device: the NVIDIA driver is installed but reports no GPU");
    }
    let root = toolkit_root();
    if !root.as_deref().is_some_and(|root| libdevice(root).is_file()) {
        let looked = match root {
            Some(root) => libdevice(&root).display().to_string(),
            None => format!("CUDA_PATH is unset and none of {} holds nvvm/libdevice", TOOLKIT_ROOTS.join(", ")),
        };
        bail!(
            "the cuda backend needs CUDA's libdevice (nvvm/libdevice/libdevice.10.bc) for its \
             kernels' math functions, and it is not here ({looked}); `bash scripts/setup-cuda.sh` \
             installs it from PyPI (nvidia-cuda-nvcc-cu12), or set CUDA_PATH to a CUDA toolkit"
        );
    }
    Ok(())
}

/// The few entry points of `libcuda.so.1` the check needs, loaded as cudarc loads them.
struct Driver {
    library: *mut c_void,
}

type CuResult = c_int;

impl Driver {
    fn open() -> Result<Self> {
        // SAFETY: dlopen with a constant, NUL-terminated name; a null return is handled.
        let library = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if library.is_null() {
            bail!(
                "no usable cuda device: the NVIDIA driver's libcuda.so.1 cannot be loaded ({}); \
                 the cuda backend needs an NVIDIA GPU and its driver (`nvidia-smi` shows both)",
                dlerror()
            );
        }
        Ok(Self { library })
    }

    fn symbol(&self, name: &CStr) -> Result<*mut c_void> {
        // SAFETY: `library` is a live handle from dlopen and `name` is NUL-terminated.
        let symbol = unsafe { libc::dlsym(self.library, name.as_ptr()) };
        if symbol.is_null() {
            bail!("no usable cuda device: libcuda.so.1 has no {} ({})", name.to_string_lossy(), dlerror());
        }
        Ok(symbol)
    }

    fn init(&self) -> Result<()> {
        // SAFETY: cuInit has this signature in every CUDA driver API version.
        let cu_init: unsafe extern "C" fn(u32) -> CuResult = unsafe { std::mem::transmute(self.symbol(c"cuInit")?) };
        // SAFETY: cuInit takes flags, which must be 0.
        match unsafe { cu_init(0) } {
            0 => Ok(()),
            code => bail!("no usable cuda device: the NVIDIA driver's cuInit failed with {}", self.error_name(code)),
        }
    }

    fn device_count(&self) -> Result<c_int> {
        // SAFETY: cuDeviceGetCount has this signature in every CUDA driver API version.
        let count: unsafe extern "C" fn(*mut c_int) -> CuResult =
            unsafe { std::mem::transmute(self.symbol(c"cuDeviceGetCount")?) };
        let mut devices: c_int = 0;
        // SAFETY: the driver writes one int through the pointer.
        match unsafe { count(&mut devices) } {
            0 => Ok(devices),
            code => bail!("no usable cuda device: cuDeviceGetCount failed with {}", self.error_name(code)),
        }
    }

    /// The driver's name for an error code (`CUDA_ERROR_NO_DEVICE`), or the number.
    fn error_name(&self, code: CuResult) -> String {
        let Ok(symbol) = self.symbol(c"cuGetErrorName") else {
            return format!("CUDA error {code}");
        };
        // SAFETY: cuGetErrorName(CUresult, const char**) in every driver API version.
        let name_of: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult = unsafe { std::mem::transmute(symbol) };
        let mut name: *const c_char = std::ptr::null();
        // SAFETY: on success the driver points `name` at a static NUL-terminated string.
        if unsafe { name_of(code, &mut name) } == 0 && !name.is_null() {
            // SAFETY: as above, a static C string owned by the driver.
            return format!("{} ({code})", unsafe { CStr::from_ptr(name) }.to_string_lossy());
        }
        format!("CUDA error {code}")
    }
}

// The library stays loaded: cudarc loads the same one next, and the driver is not built to be
// unloaded from a process that initialised it.

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: as above.
        unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
    }
}
