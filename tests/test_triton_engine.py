"""The engine with the Triton kernel set end to end, on CPU tensors under TRITON_INTERPRET=1.

A 2-layer slice of the embedded model (the interpreter runs every Triton program in Python) serves one
batch holding the base model, a LoRA, an S²FT adapter, routed experts and a RecLoRA user, through the
Triton LoRA, S²FT, routed-experts and paged-attention kernels; its greedy tokens equal the torch
kernel set's. The prompts span more than one KV block and a late request arrives while the first
ones decode, so prefill, mixed and decode steps all run.
"""
from __future__ import annotations

import json
import os
import shutil

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

pytest.importorskip("triton")

from loadtests.synthetic import s2ft_files  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.sequence import SamplingParams, Sequence  # noqa: E402
from server.lora.peft import read_adapter_files  # noqa: E402
from tests.conftest import make_peft_adapter  # noqa: E402
from tests.test_moe_lora import make_mixlora  # noqa: E402
from tests.test_reclora import make_reclora  # noqa: E402

LAYERS = 2


def slice_model(model_dir, out, layers: int):
    """A checkpoint of the first `layers` decoder layers (same embeddings, norm, tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg))
    keep = {}
    for f in model_dir.glob("*.safetensors"):
        for k, t in load_file(f).items():
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers:
                keep[k] = t
    save_file(keep, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def sliced(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-engine")
    base = slice_model(model_dir, root / "base", LAYERS)
    lora = make_peft_adapter(base, root / "lora", 8, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], seed=1, scale=0.5)
    return base, lora


def _serve(base, lora, kernels: str) -> list[list[int]]:
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=base, adapters={"lora": lora}, kernels=kernels, kv_cache_tokens=512,
                                    max_num_batched_tokens=64, max_num_seqs=8))
    cfg, dtype = engine.model.config, engine.model.dtype
    engine.adapters.add(engine.parse_adapter(s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05), "s2"))
    engine.adapters.add(engine.parse_adapter(make_mixlora(cfg, "top_k", 2)[0], "moe"))
    bank = engine.parse_adapter(make_reclora(cfg)[0], "rec")
    engine.adapters.add(bank.personalize("rec-alice", {"weights": [0.7, 0.1, 0.1, 0.1]}, dtype))
    assert engine.model.layers[0].attn.kernels.name == kernels.replace("torch", "torch-cpu")

    ids = engine.tokenizer("The capital of France is Paris, and the capital of Italy is", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    first = [Sequence(ids + [i], params, a) for i, a in enumerate([None, "lora", "s2", "moe", "rec-alice"])]
    late = Sequence(ids[:5], params, "lora")
    for s in first:
        engine.add(s)
    engine.step()  # the first wave's prefill; the late one arrives while it decodes: a mixed step
    engine.add(late)
    while engine.has_work():
        engine.step()
    seqs = first + [late]
    assert all(s.finish_reason == "length" for s in seqs), [(s.finish_reason, s.error) for s in seqs]
    return [s.output_token_ids for s in seqs]


def test_triton_kernel_set_serves_every_family_like_the_torch_set(sliced):
    base, lora = sliced
    assert _serve(base, lora, "triton") == _serve(base, lora, "torch")
