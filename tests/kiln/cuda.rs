//! The cuda backend where it cannot run: CI has no GPU, so what is checked here is that each
//! thing the backend needs, when missing, is a clear error naming it, never a panic.
//!
//! A machine without the NVIDIA driver shows the first case as it is. The others put a fake
//! `libcuda.so.1` (built here with `cc`) first on the loader's path, so they run the same on
//! a machine with a real driver.

use std::path::Path;
use std::process::{Command, Output};

/// `kiln train --backend cuda` on a tiny config, with `env` set.
fn train_on_cuda(dir: &Path, env: &[(&str, &Path)]) -> Output {
    let corpus = super::common::small_corpus(dir, 4_000);
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "output_dir = {:?}\n[model]\nhidden_size = 16\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n\
             intermediate_size = 32\nmax_position_embeddings = 16\n\
             [data]\npath = {corpus:?}\nseq_len = 8\ncache_dir = {:?}\n[training]\nmax_steps = 2\n",
            dir.join("out"),
            dir.join("cache"),
        ),
    )
    .unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(["train", "--backend", "cuda", "--config"]).arg(&config);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn assert_refused(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "expected {text:?} in: {stderr}");
    }
}

/// A `libcuda.so.1` whose `cuInit` returns `init` and which reports `devices` GPUs.
fn fake_driver(dir: &Path, init: i32, devices: i32) -> std::path::PathBuf {
    let lib = dir.join(format!("driver-{init}-{devices}"));
    std::fs::create_dir_all(&lib).unwrap();
    let source = lib.join("fake_cuda.c");
    std::fs::write(
        &source,
        format!(
            "int cuInit(unsigned flags) {{ return {init}; }}\n\
             int cuDeviceGetCount(int *count) {{ *count = {devices}; return 0; }}\n\
             int cuGetErrorName(int code, const char **name) {{\n\
               *name = code == 100 ? \"CUDA_ERROR_NO_DEVICE\" : \"CUDA_ERROR_UNKNOWN\"; return 0; }}\n"
        ),
    )
    .unwrap();
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib.join("libcuda.so.1"))
        .arg(&source)
        .status()
        .expect("cc builds the fake driver");
    assert!(status.success());
    lib
}

#[test]
fn the_cuda_backend_without_what_it_needs_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let no_toolkit = dir.path().join("no-toolkit");
    std::fs::create_dir_all(&no_toolkit).unwrap();

    // SAFETY: dlopen/dlclose of a library by name; only whether it loads is used.
    let driver_here = unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY);
        !handle.is_null() && libc::dlclose(handle) == 0
    };
    if !driver_here {
        let output = train_on_cuda(dir.path(), &[]);
        assert_refused(&output, &["no usable cuda device", "libcuda.so.1 cannot be loaded", "NVIDIA"]);
    }

    let output = train_on_cuda(dir.path(), &[("LD_LIBRARY_PATH", &fake_driver(dir.path(), 100, 0))]);
    assert_refused(&output, &["no usable cuda device", "cuInit failed with CUDA_ERROR_NO_DEVICE (100)"]);

    let output = train_on_cuda(dir.path(), &[("LD_LIBRARY_PATH", &fake_driver(dir.path(), 0, 0))]);
    assert_refused(&output, &["no usable cuda device", "reports no GPU"]);

    let output = train_on_cuda(
        dir.path(),
        &[("LD_LIBRARY_PATH", &fake_driver(dir.path(), 0, 1)), ("CUDA_PATH", &no_toolkit)],
    );
    assert_refused(&output, &["libdevice.10.bc", "no-toolkit", "scripts/setup-cuda.sh"]);
    let saved = std::fs::read_dir(dir.path().join("out/checkpoints")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(saved, 0, "nothing is trained or saved");
}
