#!/usr/bin/env bash
# Installs what the tests need, then runs them: README's test command, and what CI runs.
#
# - Mesa's lavapipe, a Vulkan driver that runs on the CPU, for the wgpu test (Debian's
#   `mesa-vulkan-drivers`), and Open MPI with libclang for the `mpi` feature and the
#   data-parallel tests (`openmpi-bin`, `libopenmpi-dev`, `libclang-dev`); Debian packages, which
#   need root or sudo, skipped when installed already.
# - The LLVM that the cuda backend builds against (`scripts/setup-cuda.sh`, from PyPI): the
#   tests are built with `cuda` too, so that it is compiled in the same single build (there is
#   no GPU here to run it; its tests check the errors it gives without one).
# - A Python virtual environment (`.venv`, or $KILN_TEST_VENV) with torch, transformers,
#   safetensors, tokenizers (the references the compatibility tests compare kiln with),
#   pyarrow (which writes the parquet sources the dataset tests prepare), gguf (llama.cpp's
#   reader and reference quantizer) and mergekit (the reference of `kiln merge`). It
#   sees the system's site-packages, so packages already installed are not downloaded again;
#   what is missing is installed into it, never into the system.
#
# Arguments go to `cargo test` (e.g. `bash scripts/test.sh hf::` to run some tests only).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
if ! compgen -G "/usr/share/vulkan/icd.d/lvp_icd*.json" >/dev/null; then
  packages+=(mesa-vulkan-drivers libvulkan1)
fi
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null || ! compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null; then
  packages+=(openmpi-bin libopenmpi-dev libclang-dev)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "test.sh: installing ${packages[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
# Mesa's window-system probing warns without it; lavapipe needs no display.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

venv="${KILN_TEST_VENV:-.venv}"
if [ ! -x "$venv/bin/python3" ]; then
  echo "test.sh: creating the Python environment $venv"
  python3 -m venv --system-site-packages "$venv"
fi
if ! "$venv/bin/python3" -c "import torch, transformers, safetensors, tokenizers, pyarrow" 2>/dev/null; then
  echo "test.sh: installing torch, transformers, safetensors, tokenizers, pyarrow into $venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check torch transformers safetensors tokenizers pyarrow
fi
# The references kiln's GGUF and merge semantics were written against, pinned.
if ! "$venv/bin/python3" -c "import gguf, mergekit, importlib.metadata as m; assert m.version('gguf') == '0.19.0' and m.version('mergekit') == '0.1.5'" 2>/dev/null; then
  echo "test.sh: installing gguf 0.19.0 and mergekit 0.1.5 into $venv"
  "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check gguf==0.19.0 mergekit==0.1.5
fi
# The tests run `python3`: this environment's.
export PATH="$(cd "$venv" && pwd)/bin:$PATH"

bash scripts/setup-cuda.sh

exec cargo test --release --locked --features wgpu,cuda,mpi "$@"
