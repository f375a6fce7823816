"""The GPU-placement test a CPU machine can run: the whole engine on the `meta` device.

The model, KV cache, adapter pools, routers, plans and per-step tensors are built on `meta` (tensors
with shapes and no data) and real engine steps run over them: prefill, chunked prefill, decode and
mixed steps, a batch holding every adapter family, greedy, top-p and seeded sampling, each
quantization mode. `DevicePlacement` fails any op that mixes a device tensor with a CPU tensor
("Tensor on device cpu is not on the expected device meta") — a tensor created without the engine's
device — except explicit copies, which is how host data is meant to reach the device. A host sync
inside a step fails too: a meta tensor has no data to copy out.

What cannot run on `meta` and is replaced here, said so: the step's one device->host transfer
(`ModelRunner._to_host`, the sampled token ids) returns token 0 for every row; and the engine's
one-at-a-time retry of a failed batch (`LLMEngine._run`) is bypassed so that a placement error fails
the test instead of failing a request. Adapters are parsed on the host by a CPU engine (parsing is
host work; DoRA's parser reads the base weights' values, which `meta` does not have).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loadtests.synthetic import s2ft_files
from server.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_runner import ModelRunner
from server.engine.sequence import SamplingParams, Sequence
from server.lora.peft import read_adapter_files
from tests.test_moe_global_gates import make_mole
from tests.test_moe_lora import make_mixlora
from tests.test_reclora import make_reclora

COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}


class DevicePlacement(TorchDispatchMode):
    """Fails an op that takes a tensor on `device` together with a CPU tensor of one or more
    elements (what CUDA refuses too; 0-dim CPU scalars it accepts), unless the op is a copy."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.ops = device, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in COPIES:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(t.device == self.device for t in tensors):
                for t in tensors:
                    if t.device != self.device and t.dim() > 0:
                        raise AssertionError(f"{func}: Tensor on device {t.device} is not on the expected device {self.device}")
        self.ops += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def host_engine(model_dir):
    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=256))


@pytest.fixture(scope="module")
def family_weights(host_engine, model_dir, adapter_dirs, tmp_path_factory):
    """One adapter of every family, parsed on the host."""
    from tests.test_dora import make_dora_adapter

    cfg, e = host_engine.model.config, host_engine
    out = {
        "lora": e.parse_adapter(read_adapter_files(adapter_dirs["r8-all"], "lora"), "lora"),
        "lora-attn": e.parse_adapter(read_adapter_files(adapter_dirs["r16-attn"], "lora-attn"), "lora-attn"),
        "s2ft": e.parse_adapter(s2ft_files(cfg, torch.Generator().manual_seed(0), fraction=0.05), "s2ft"),
        "mixlora": e.parse_adapter(make_mixlora(cfg, "top_k", 2)[0], "mixlora"),
        "mole": e.parse_adapter(make_mole(cfg)[0], "mole"),
    }
    dora_dir = make_dora_adapter(model_dir, tmp_path_factory.mktemp("dora") / "d", 0, ["q_proj", "v_proj", "down_proj"])
    out["dora"] = e.parse_adapter(read_adapter_files(dora_dir, "dora"), "dora")
    bank = e.parse_adapter(make_reclora(cfg)[0], "rec")
    out["reclora-alice"] = bank.personalize("reclora-alice", {"weights": [0.7, 0.1, 0.1, 0.1]}, e.model.dtype)
    return out


def _meta_engine(model_dir, quantization: str, monkeypatch) -> LLMEngine:
    engine = LLMEngine(EngineConfig(model=model_dir, device="meta", dtype="bfloat16", quantization=quantization,
                                    kv_cache_tokens=1024, max_num_batched_tokens=48, max_num_seqs=16))
    monkeypatch.setattr(ModelRunner, "_to_host", staticmethod(lambda tokens: [0] * tokens.shape[0]))
    monkeypatch.setattr(engine, "_run", engine.runner.run)
    return engine


def _assert_on(engine: LLMEngine, device: torch.device) -> None:
    layer = engine.model.layers[0]
    assert layer.attn.k_cache.device == device and engine.model.norm.weight.device == device
    for lin in layer.linears():
        assert lin.weight is None or lin.weight.device == device
        for slot in lin.slots.values():
            assert all(p.device == device for p in slot.pools.values())


def _run_steps(engine: LLMEngine, jobs: list[tuple[list[int], str | None, SamplingParams]]) -> tuple[list[Sequence], list[tuple[int, int, int]]]:
    """Add every job, step until all finish under DevicePlacement; the (decode, prefill, sequences) counts of each step."""
    seqs = [Sequence(ids, params, adapter) for ids, adapter, params in jobs]
    for seq in seqs:
        engine.add(seq)
    kinds = []
    mode = DevicePlacement(engine.device)
    while engine.has_work():
        with mode:
            engine.step()
        step = engine.last_step
        if step is not None:
            kinds.append((step.num_seqs, step.num_tokens))
        assert len(kinds) < 200
    assert mode.ops > 0
    return seqs, kinds


def test_every_step_kind_and_family_runs_on_the_meta_device(model_dir, family_weights, monkeypatch):
    engine = _meta_engine(model_dir, "none", monkeypatch)
    meta = torch.device("meta")
    assert engine.device == meta and engine.runner.device == meta
    for weights in family_weights.values():
        engine.adapters.add(weights)
    _assert_on(engine, meta)
    for entry in engine.adapters.resident.values():
        if entry.weights is not None:  # routed experts keep their routers for the step hooks
            assert all(r.device == meta for r in entry.weights.routers.values())

    short, long = list(range(100, 112)), list(range(200, 290))  # the long one is prefilled in chunks (48-token steps)
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    top_p = SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, top_k=20, ignore_eos=True)
    seeded = SamplingParams(max_tokens=4, temperature=1.0, seed=7, ignore_eos=True)
    jobs = [(short, None, greedy), (long, "lora", greedy)]
    jobs += [(short, name, [greedy, top_p, seeded][i % 3]) for i, name in enumerate(family_weights)]
    seqs, kinds = _run_steps(engine, jobs)
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 4 for s in seqs), [(s.finish_reason, s.error) for s in seqs]
    assert any(n == len(jobs) for n, _ in kinds)  # a step held every family and the base at once
    assert any(tokens < 48 and n > 1 for n, tokens in kinds)  # decode (mixed with the long prompt's chunks) ...
    assert any(tokens == 48 for _, tokens in kinds)  # ... and full chunked-prefill steps


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_a_quantized_base_runs_on_the_meta_device(model_dir, family_weights, quantization, monkeypatch):
    engine = _meta_engine(model_dir, quantization, monkeypatch)
    engine.adapters.add(family_weights["lora"])
    _assert_on(engine, torch.device("meta"))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    seqs, _ = _run_steps(engine, [(list(range(100, 160)), "lora", params), (list(range(300, 310)), None, params)])
    assert all(s.finish_reason == "length" for s in seqs)


def test_the_checker_catches_a_tensor_created_on_the_cpu(model_dir, monkeypatch):
    """The test is only as good as its checker: a forgotten device= in the step is caught."""
    engine = _meta_engine(model_dir, "none", monkeypatch)
    forward = ModelRunner.forward

    def forgetful(self, step, ctx):
        return forward(self, {**step, "positions": torch.arange(step["positions"].shape[0])}, ctx)  # no device=

    monkeypatch.setattr(ModelRunner, "forward", forgetful)
    with pytest.raises(AssertionError, match="Tensor on device cpu is not on the expected device meta"):
        _run_steps(engine, [(list(range(100, 110)), None, SamplingParams(max_tokens=1, temperature=0.0))])


def test_the_decode_graphs_static_buffers_run_on_the_meta_device(model_dir, family_weights, monkeypatch):
    """The CUDA-graph path's forward (server.engine.decode_graphs) over its static buffers, graphs replaced
    by plain calls (EagerBackend: capture needs CUDA)."""
    from server.engine.decode_graphs import DecodeGraphs, EagerBackend

    engine = _meta_engine(model_dir, "none", monkeypatch)
    for name in ("lora", "lora-attn", "reclora-alice"):
        engine.adapters.add(family_weights[name])
    with DevicePlacement(engine.device):
        graphs = engine.runner.graphs = DecodeGraphs(engine.runner, 8, 64, 64, EagerBackend(), progress=False)
    replayed = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda layout, fresh: (replayed.append(len(layout.decode_tables)), run(layout, fresh))[1])
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    seqs, _ = _run_steps(engine, [(list(range(100, 110)), a, params) for a in (None, "lora", "lora-attn", "reclora-alice", "lora")])
    assert all(s.finish_reason == "length" for s in seqs)
    assert 5 in replayed  # decode steps of all five went through the static buffers (the last prompt, chunked, trails by a step)
