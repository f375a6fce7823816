# The hotswap server image, with the embedded default model baked in. One Dockerfile for the CPU and
# the CUDA image (a build argument picks torch's wheel index), so the two cannot drift.
#   docker build -t hotswap .                                                # CPU (TORCH_VARIANT=cpu)
#   docker build -t hotswap:cu128 --build-arg TORCH_VARIANT=cu128 .          # CUDA 12.8 (or cu126, ...)
#   docker run --rm -p 8000:8000 -e HOTSWAP_ADMIN_KEY=... hotswap            # extra args go to `hotswap serve`
#   docker run --rm --gpus all -p 8000:8000 -e HOTSWAP_ADMIN_KEY=... hotswap:cu128
# The CUDA wheels bring the CUDA runtime libraries and triton with them; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit (for --gpus). The CUDA image serves with
# HOTSWAP_DEVICE=cuda: without a visible GPU it stops in one line instead of falling back to the CPU
# (-e HOTSWAP_DEVICE=auto allows the fallback).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOTSWAP_HOME=/opt/hotswap

WORKDIR /app

# cpu | cu128 | cu126 | ...: a wheel index under https://download.pytorch.org/whl/
ARG TORCH_VARIANT=cpu

# torch first, from its variant's index: the default PyPI torch is a multi-GB CUDA build the CPU
# image does not need, and the CUDA image needs the build of a chosen CUDA version. pyproject only
# asks for torch>=2.6, so pip keeps this one. The CUDA image also gets a C compiler: triton builds
# its small launcher module with one the first time it runs on a GPU. The CPU image gets a C++ one:
# inductor builds the compiled decode step (server/engine/compiled_decode.py) with it at start-up
# (without one the server still runs, decoding eagerly).
RUN case "$TORCH_VARIANT" in \
        cpu) apt-get update \
            && apt-get install -y --no-install-recommends g++ libc6-dev \
            && rm -rf /var/lib/apt/lists/* ;; \
        cu[0-9]*) apt-get update \
            && apt-get install -y --no-install-recommends gcc libc6-dev \
            && rm -rf /var/lib/apt/lists/* ;; \
        *) echo "TORCH_VARIANT=$TORCH_VARIANT: use cpu or a CUDA wheel index such as cu128 or cu126" >&2; exit 1 ;; \
    esac \
    && pip install torch --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# Dependencies (plus the `cuda` extra on a CUDA variant) and the converted embedded model
# (SmolLM2-135M-Instruct, into $HOTSWAP_HOME) in layers that depend only on pyproject.toml and
# embedded.py, so code changes don't redo the ~95 MB download and conversion.
COPY pyproject.toml ./
COPY server/__init__.py server/
COPY server/models/__init__.py server/models/embedded.py server/models/
RUN if [ "$TORCH_VARIANT" = cpu ]; then pip install .; else pip install '.[cuda]'; fi \
    && python -m server.models.embedded

# The full application.
COPY . .
RUN pip install --no-deps --force-reinstall .

# cpu -> cpu, cu128 / cu126 / ... -> cuda. The ${VAR/pattern/replacement} form needs Dockerfile
# syntax 1.7 or later (BuildKit 0.13+); an older builder stops here with "unsupported modifier"
# rather than building a wrong image.
ENV HOTSWAP_DEVICE=${TORCH_VARIANT/cu*/cuda}

EXPOSE 8000
ENTRYPOINT ["hotswap", "serve"]
# A non-loopback address needs a key: the server refuses to start without HOTSWAP_ADMIN_KEY.
CMD ["--host", "0.0.0.0"]
