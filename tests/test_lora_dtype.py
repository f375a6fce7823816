"""--lora-dtype: LoRA pools stored in bfloat16 under float32 activations (the CPU default) stay close to
float32 pools and to HF transformers + peft, in the kernels and end to end, for every family served
from the LoRA pools (plain LoRA, routed experts)."""
from __future__ import annotations

import pytest
import torch

from kernels import make_bgmv_plan, sgmv_lora, sgmv_lora_reference
from server.config import EngineConfig
from server.engine.device import resolve_lora_dtype
from server.engine.sequence import SamplingParams, Sequence
from server.models.config import ModelConfig
from tests.conftest import greedy_outputs
from tests.test_kernels import PATTERNS, make_batch
from tests.test_moe_global_gates import engine_greedy
from tests.test_moe_lora import make_mixlora, write
from tests.test_oracle_parity import PROMPTS, _hf_model

# Storing a pool in bf16 rounds each weight by up to 2^-9 relative; the fast op also rounds the shrink
# output h and the delta to bf16 in the B pass (float32 accumulation inside): the delta is within
# ~1 % of its largest element of the float32 computation on the same stored weights.
DELTA_RTOL = 1e-2
# End to end, against the float32 oracle (HF + peft with the adapter's float32 weights): measured up
# to 0.076 (r8-rslora, the largest scale; r8-all 0.02) on logits of magnitude ~10-30; float32 pools
# stay under 2e-3 (test_oracle_parity).
LOGIT_ATOL = 0.15


def test_auto_is_bfloat16_on_the_cpu_and_the_models_dtype_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_lora_dtype("auto", cpu, torch.float32) == torch.bfloat16
    assert resolve_lora_dtype("auto", cpu, torch.bfloat16) == torch.bfloat16
    assert resolve_lora_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16
    assert resolve_lora_dtype("auto", cuda, torch.float32) == torch.float32
    assert resolve_lora_dtype("float32", cpu, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="--lora-dtype 'int3'"):
        resolve_lora_dtype("int3", cpu, torch.float32)


def test_the_cpu_lora_op_builds_where_a_compiler_is():
    import shutil

    from kernels import cpu_lora

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the ATen path serves (tests/test_kernels.py runs it)")
    assert cpu_lora.get() is not None


@pytest.fixture(params=["cpp", "aten"])
def cpu_path(request, monkeypatch):
    """The kernel tests below run through the C++ op and through the ATen path (its widening code)."""
    from kernels import cpu_lora

    if request.param == "aten":
        monkeypatch.setitem(cpu_lora._state, "op", None)
    elif cpu_lora.get() is None:
        pytest.skip("the C++ LoRA op could not be built here")
    return request.param


def _delta_close(y: torch.Tensor, y_ref: torch.Tensor, y0: torch.Tensor) -> None:
    scale = max(float((y_ref - y0).abs().max()), 1e-6)
    err = float((y - y_ref).abs().max())
    assert err <= DELTA_RTOL * scale, f"max error {err:.3g} vs largest delta {scale:.3g}"


@pytest.mark.parametrize("tokens", [1, (1, 9)], ids=["decode", "prefill"])
@pytest.mark.parametrize("num_seqs", [1, 3, 24])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bf16_pools_under_float32_activations_match_the_reference(pattern, num_seqs, tokens, cpu_path):
    """Every path the plan picks (loop, batched, loop+batched) reads the narrow pools correctly."""
    b = make_batch(pattern, num_seqs, tokens, d_in=48, d_out=40, seed=num_seqs)
    a16, b16 = b.lora_a.bfloat16(), b.lora_b.bfloat16()
    y_ref, y = b.y.clone(), b.y.clone()
    sgmv_lora_reference(y_ref, b.x, a16, b16, b.plan)  # float32 math on the stored bf16 weights
    sgmv_lora(y, b.x, a16, b16, b.plan)
    assert y.dtype == torch.float32
    _delta_close(y, y_ref, b.y)
    y32 = b.y.clone()
    sgmv_lora(y32, b.x, b.lora_a, b.lora_b, b.plan)  # and close to the float32 pools themselves
    _delta_close(y, y32, b.y)


def test_bf16_pools_on_the_bgmv_path(cpu_path):
    b = make_batch("uniform", 12, 1, d_in=48, d_out=40, seed=3)
    rows = torch.tensor([o for s, e, o in zip(b.plan.seg_indptr, b.plan.seg_indptr[1:], b.plan.seg_row_start) for _ in range(s, e)])
    ranks = torch.tensor([r for s, e, r in zip(b.plan.seg_indptr, b.plan.seg_indptr[1:], b.plan.seg_rank) for _ in range(s, e)])
    plan = make_bgmv_plan(rows, torch.where(rows >= 0, ranks, 0), max(b.plan.seg_rank))
    a16, b16 = b.lora_a.bfloat16(), b.lora_b.bfloat16()
    y_ref, y = b.y.clone(), b.y.clone()
    sgmv_lora_reference(y_ref, b.x, a16, b16, plan)
    sgmv_lora(y, b.x, a16, b16, plan)
    _delta_close(y, y_ref, b.y)


@pytest.fixture(scope="module")
def bf16_engine(model_dir, adapter_dirs):
    from server.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(quantization="none", lora_dtype="bfloat16", model=model_dir, adapters=dict(adapter_dirs), kv_cache_tokens=4096))


def test_pools_are_stored_in_bf16_and_cost_half(bf16_engine, engine):
    assert bf16_engine.lora_dtype_name == "bfloat16" and engine.lora_dtype_name == "float32"
    pools = [p for layer in bf16_engine.model.layers for lin in layer.linears() for s in lin.slots.values() for p in s.pools.values()]
    assert pools and all(p.dtype == torch.bfloat16 for p in pools)
    assert bf16_engine.adapters.spaces["lora"].unit_bytes * 2 == engine.adapters.spaces["lora"].unit_bytes
    assert bf16_engine.model.layers[0].qkv_proj.weight.dtype == torch.float32  # activations and base stay float32


@pytest.mark.parametrize("adapter", ["r8-all", "r16-attn", "r8-rslora"])
def test_bf16_pools_keep_greedy_parity_with_transformers_peft(bf16_engine, model_dir, adapter_dirs, adapter):
    hf = _hf_model(model_dir, adapter_dirs[adapter])
    for prompt in PROMPTS:
        ids = bf16_engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref_tokens = hf.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
            ref_logits = hf(torch.tensor([ids[0].tolist() + ref_tokens[:-1]])).logits[0].float()
        tokens, logits = engine_greedy(bf16_engine, ids[0].tolist(), adapter, 16)
        assert tokens == ref_tokens, f"{adapter}: {prompt!r}"
        err = (logits - ref_logits).abs().max().item()
        assert err < LOGIT_ATOL, f"{adapter}: {prompt!r}: max |logit diff| {err}"


def test_weights_that_overflow_bf16_pools_are_refused_at_placement(bf16_engine, engine, adapter_dirs):
    """3.4e38 is a float32 number but an infinity in bfloat16: the parse (in the model's float32) takes it,
    the placement into bf16 pools refuses it (a request with it then fails alone, as any adapter that
    cannot be placed); float32 pools hold it."""
    from safetensors.torch import load, save

    from server.errors import InvalidAdapter

    files = {n: (adapter_dirs["r8-all"] / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    tensors = load(files["adapter_model.safetensors"])
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key][0, 0] = 3.4e38
    files["adapter_model.safetensors"] = save(tensors)
    with pytest.raises(InvalidAdapter, match="overflows the bfloat16 adapter pools"):
        bf16_engine.adapters.ensure_resident(bf16_engine.parse_adapter(files, "huge"))
    assert bf16_engine.adapters.get("huge") is None and len(bf16_engine.adapters.resident) == len(adapter_dirs)
    # a request with it fails alone; another request in the same steps gets its own tokens
    good = ("Once upon a time", "r8-all")
    alone = greedy_outputs(bf16_engine, [good], 8)[0]
    huge = Sequence(bf16_engine.tokenizer("Hello there")["input_ids"], SamplingParams(max_tokens=8, temperature=0.0), "t/huge@v1",
                    adapter_weights=bf16_engine.parse_adapter(files, "t/huge@v1"))
    other = Sequence(bf16_engine.tokenizer(good[0])["input_ids"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), good[1])
    for seq in (huge, other):
        bf16_engine.add(seq)
    while bf16_engine.has_work():
        bf16_engine.step()
    assert huge.finish_reason == "error" and huge.error.status >= 400
    assert other.output_token_ids == alone
    weights = engine.parse_adapter(files, "huge32")
    assert engine.adapters.ensure_resident(weights) is not None
    assert engine.adapters.remove("huge32")


def test_routed_experts_read_bf16_pools(model_dir, tmp_path):
    """MixLoRA experts live in the LoRA pools too: their stacked copies are widened to the model's dtype."""
    from server.engine.llm_engine import LLMEngine

    files, _ = make_mixlora(ModelConfig.from_dir(model_dir), "top_k", 2)
    path = write(files, tmp_path / "moe")
    got = {}
    for lora_dtype in ("float32", "bfloat16"):
        engine = LLMEngine(EngineConfig(quantization="none", lora_dtype=lora_dtype, model=model_dir, adapters={"moe": path}, kv_cache_tokens=1024))
        ids = engine.tokenizer(PROMPTS[0])["input_ids"]
        got[lora_dtype] = engine_greedy(engine, ids, "moe", 12)
    (t32, l32), (t16, l16) = got["float32"], got["bfloat16"]
    assert t16 == t32
    assert (l16 - l32).abs().max().item() < LOGIT_ATOL


def test_cli_flag(capsys):
    from server.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--lora-dtype" in capsys.readouterr().out
