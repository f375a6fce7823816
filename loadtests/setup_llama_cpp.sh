#!/usr/bin/env bash
# Idempotent build of llama.cpp's llama-server (the comparison's third peer) into its own directory
# (default .llama-cpp), for loadtests/compare.py and loadtests/llama_cpp.py.
#
# The sources are the llama.cpp tree vendored in the llama-cpp-python sdist on PyPI (PyPI is the one
# source reachable here): `pip download --no-binary :all: --no-deps llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION`,
# extracted to $DIR/src.  Only the llama-server and llama-quantize targets are built (Release, native
# CPU flags, no CUDA, no curl/OpenSSL, no web UI: the UI would otherwise be fetched from a Hugging Face
# bucket at build time), under `nice -n 19` with -j2, into $DIR/build; the binaries land in $DIR/bin.
#
# The conversion scripts (convert_hf_to_gguf.py, convert_lora_to_gguf.py) get a small venv of their own,
# $DIR/venv, rather than the project's: the vendored requirements pin transformers==4.57.6 (the
# project runs transformers 5, whose tokenizer and config classes the converter does not target), so we
# install what they pin except torch, which is the on-disk CPU wheel (their pin, 2.11.0 from the
# PyTorch index, is not reachable here; the converter only uses torch to read tensors) or else PyPI's.
# The vendored gguf-py is installed into that venv, so the gguf reader/writer matches the converter.
#
# A stamp file marks a finished build; delete it (or the directory) to rebuild.
#   loadtests/setup_llama_cpp.sh [DIR]
set -euo pipefail
DIR="${1:-.llama-cpp}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
TORCH_WHEEL="${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}"
JOBS="${JOBS:-2}"
STAMP="$DIR/.built-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"

if [ -f "$STAMP" ]; then
    echo "llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist) already built in $DIR"
    exit 0
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
t0=$(date +%s)
echo "llama.cpp peer: llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist -> $DIR"

# 1. sources
SDIST="$DIR/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    mkdir -p "$DIR/dl"
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DIR/dl"
fi
SRC="$DIR/src"
if [ ! -f "$SRC/.extracted-$LLAMA_CPP_PYTHON_VERSION" ]; then
    rm -rf "$SRC" "$DIR/build"
    mkdir -p "$SRC"
    # only the vendored llama.cpp tree: the Python bindings around it are not needed
    tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    rm -f "$SRC/.git"  # a submodule pointer into the bindings' repository, which the sdist does not have
    touch "$SRC/.extracted-$LLAMA_CPP_PYTHON_VERSION"
fi

# 2. llama-server + llama-quantize
cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_CUDA=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_NUMBER="0" -DLLAMA_BUILD_COMMIT="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION" \
    -Wno-dev > "$DIR/cmake-configure.log"
echo "building llama-server and llama-quantize (nice 19, -j$JOBS; log $DIR/build.log) ..."
if ! nice -n 19 cmake --build "$DIR/build" --config Release -j "$JOBS" --target llama-server llama-quantize > "$DIR/build.log" 2>&1; then
    tail -n 40 "$DIR/build.log"
    echo "llama.cpp build failed; full log $DIR/build.log" >&2
    exit 1
fi
mkdir -p "$DIR/bin"
cp -f "$DIR/build/bin/llama-server" "$DIR/build/bin/llama-quantize" "$DIR/bin/"
"$DIR/bin/llama-server" --version 2>&1 | tail -n 2
echo "built in $(( $(date +%s) - t0 )) s"

# 3. the conversion scripts' venv
VENV="$DIR/venv"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -f "$TORCH_WHEEL" ]; then
    $PIP install -q "$TORCH_WHEEL"
else
    $PIP install -q torch
fi
$PIP install -q "transformers==4.57.6" "numpy>=2.2,<2.5" "sentencepiece>=0.1.98,<0.3.0" "protobuf>=4.21.0,<5.0.0" safetensors
$PIP install -q "$SRC/gguf-py"
"$VENV/bin/python" -c "import gguf, torch, transformers; print('conversion venv: gguf', gguf.__file__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

echo "$LLAMA_CPP_PYTHON_VERSION" > "$DIR/VERSION"
touch "$STAMP"
echo "llama.cpp (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist) built in $DIR in $(( $(date +%s) - t0 )) s"
