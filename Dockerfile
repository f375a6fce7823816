# CPU image of the hotswap server, with the embedded default model baked in.
#   docker build -t hotswap .
#   docker run --rm -p 8000:8000 -e HOTSWAP_ADMIN_KEY=... hotswap   # extra args go to `hotswap serve`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOTSWAP_HOME=/opt/hotswap

WORKDIR /app

# CPU-only torch first: the default PyPI torch is a multi-GB CUDA build.
# pyproject only asks for torch>=2.6, so pip keeps this one.
RUN pip install torch --index-url https://download.pytorch.org/whl/cpu

# Dependencies and the converted embedded model (SmolLM2-135M-Instruct, into
# $HOTSWAP_HOME) in layers that depend only on pyproject.toml and embedded.py,
# so code changes don't redo the ~95 MB download and conversion.
COPY pyproject.toml ./
COPY server/__init__.py server/
COPY server/models/__init__.py server/models/embedded.py server/models/
RUN pip install . && python -m server.models.embedded

# The full application.
COPY . .
RUN pip install --no-deps --force-reinstall .

EXPOSE 8000
ENTRYPOINT ["hotswap", "serve"]
# A non-loopback address needs a key: the server refuses to start without HOTSWAP_ADMIN_KEY.
CMD ["--host", "0.0.0.0"]
