#!/usr/bin/env bash
# Install unihal with everything `hal conformance` and the tests use, on a fresh machine.
#
#   scripts/install.sh            # into the active virtual environment (or the python3 on PATH)
#
# 1. System packages (apt, when this user may install them): Debian's PoCL, the OpenCL runtime
#    the opencl backend is certified on (pip's pocl-binary-distribution 3.0 crashes on AVX-512
#    hosts), and chromium for the report-rendering test. Without apt, those parts say why they
#    are skipped; nothing else changes.
# 2. torch: an importable torch is kept (install your CUDA or ROCm build first). Otherwise
#    torch==2.13.0 from pip's configured indexes; set HAL_TORCH_INDEX_URL (for the CPU build:
#    https://download.pytorch.org/whl/cpu) to take it from a PyTorch index instead.
# 3. unihal in editable mode with the extras a CPU machine can use ([dev]: tests; [cuda]: Triton,
#    whose kernels run here in its interpreter; [opencl]: pyopencl), and the out-of-tree example
#    backend examples/hal-numpy, installed exactly as a vendor's package would be.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
step() { printf '\n== %s\n' "$*"; }

has_pocl() {  # Debian's PoCL: dpkg knows, where there is dpkg; elsewhere its ICD file tells
  if command -v dpkg-query >/dev/null 2>&1; then
    dpkg-query -W -f='${Status}' pocl-opencl-icd 2>/dev/null | grep -q "install ok installed"
  else
    [ -e /etc/OpenCL/vendors/pocl.icd ]
  fi
}
packages=()
has_pocl || packages+=(pocl-opencl-icd)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"; }
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
    step "system packages: ${packages[*]} (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    echo "note: cannot install ${packages[*]} (needs apt-get as root): the opencl backend reports itself unavailable" \
         "and the report-rendering test is skipped; install them with your package manager to cover those parts." >&2
  fi
fi

if "$python" -c "import torch" 2>/dev/null; then
  step "torch $("$python" -c 'import torch; print(torch.__version__)') is installed: kept"
else
  step "torch 2.13.0${HAL_TORCH_INDEX_URL:+ from $HAL_TORCH_INDEX_URL}"
  "$python" -m pip install --quiet ${HAL_TORCH_INDEX_URL:+--index-url "$HAL_TORCH_INDEX_URL"} "torch==2.13.0"
fi

step "unihal[dev,cuda,opencl] (editable) and the example backend examples/hal-numpy"
"$python" -m pip install --quiet -e ".[dev,cuda,opencl]"
"$python" -m pip install --quiet -e examples/hal-numpy
step "installed: $(command -v hal)"
