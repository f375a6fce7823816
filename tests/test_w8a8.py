"""The w8a8 base (kernels.w8a8): SmoothQuant int8 weights x per-token int8 activations on the CPU."""
from __future__ import annotations

import pytest
import torch

from kernels.quant import PACKED_MAX_ROWS
from kernels.w8a8 import ROWS_INT_MM, quantize_w8a8, w8a8_linear, w8a8_linear_reference
from tests.conftest import greedy_outputs


def _weight(n: int = 96, k: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    act_amax = torch.rand(k, generator=g) * 4 + 0.1
    act_amax[3] = 60.0  # an outlier channel, what smoothing is for
    return w, quantize_w8a8(w, act_amax), g


@pytest.mark.parametrize("rows", [1, ROWS_INT_MM - 1, ROWS_INT_MM, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_op_matches_reference(rows, bias, monkeypatch):
    # the int8 x int8 path whether or not this CPU has VNNI (without it, _int_mm is slow but the same numbers)
    monkeypatch.setattr("kernels.w8a8.INT_MM_FAST", True)
    w, q, g = _weight()
    x = torch.randn(rows, 80, generator=g)
    x[:, 3] *= 30
    b = torch.randn(96, generator=g) if bias else None
    ref = w8a8_linear_reference(x, q, b)
    got = w8a8_linear(x, q, b)
    if rows >= ROWS_INT_MM:  # the int8 x int8 GEMM: the reference's numbers, up to float32 summation order
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    else:  # the weight-only kernel on bf16 activations instead of 8-bit ones: closer to x Wᵀ, not further
        dense = x @ w.T + (0 if b is None else b)
        assert (got - dense).abs().max() <= (ref - dense).abs().max() * 1.5 + 1e-2


@pytest.mark.parametrize("rows", [ROWS_INT_MM, 33, PACKED_MAX_ROWS + 1])
def test_without_vnni_the_op_stays_weight_only(rows, monkeypatch):
    monkeypatch.setattr("kernels.w8a8.INT_MM_FAST", False)
    w, q, g = _weight()
    x = torch.randn(rows, 80, generator=g)
    dense = x @ w.T
    weight_only = (x * q.inv_s) @ (q.q.float() * q.scale[:, None]).T  # the smoothed int8 weights, unrounded activations
    torch.testing.assert_close(w8a8_linear(x, q), weight_only, rtol=2e-2, atol=2e-2)  # bf16 activations in int8pack
    assert (w8a8_linear(x, q) - dense).abs().max() <= (w8a8_linear_reference(x, q) - dense).abs().max() * 1.5 + 1e-2


def test_dequantize_gives_back_the_unsmoothed_weight():
    w, q, _ = _weight()
    half_step = 0.5 * q.scale[:, None] * q.inv_s[None, :]  # rounding to the smoothed grid, back in W's units
    assert ((q.dequantize() - w).abs() <= half_step * 1.001 + 1e-7).all()


def test_a_tokens_numbers_do_not_depend_on_the_rest_of_the_batch():
    """Activations are quantized per token: a huge row from another request changes no other row."""
    _, q, g = _weight()
    x = torch.randn(12, 80, generator=g)
    alone = w8a8_linear(x, q)
    hostile = x.clone()
    hostile[5] *= 1e4
    together = w8a8_linear(hostile, q)
    assert torch.equal(torch.cat([together[:5], together[6:]]), torch.cat([alone[:5], alone[6:]]))


def test_w8a8_is_a_cpu_mode(model_dir):
    from server.models.loader import load_model
    from server.models.quantize import quantize_model

    model = load_model(model_dir, torch.float32, 64, progress=False)
    with pytest.raises(ValueError, match="w8a8 runs on the CPU"):
        quantize_model(model, "w8a8", progress=False, device="meta", calibration_ids=[1, 2, 3])


def test_perplexity_within_three_percent_of_the_dense_base(model_dir):
    """The bound of tests/test_quantization.py, on the same 512 tokens (calibrated on another text)."""
    from transformers import AutoTokenizer

    from server.models.calibration import calibration_ids
    from server.models.loader import load_model
    from server.models.perplexity import perplexity
    from server.models.quantize import quantize_model
    from tests.test_quantization import _text_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = _text_ids(tok, 512)
    dense = perplexity(load_model(model_dir, torch.float32, 512, progress=False), ids)
    model = load_model(model_dir, torch.float32, 512, progress=False)
    quantize_model(model, "w8a8", progress=False, calibration_ids=calibration_ids(tok))
    assert perplexity(model, ids) <= dense * 1.03


def test_engine_on_a_w8a8_base_answers_and_serves_adapters(model_dir, adapter_dirs):
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model_dir, quantization="w8a8", adapters={"r8-all": adapter_dirs["r8-all"]}, kv_cache_tokens=2048))
    assert engine.quantization == "w8a8" and "torch._int_mm" in engine.kernels["base"]
    chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    jobs = [(chat, None), (chat, "r8-all"), ("def add(a, b):", "r8-all"), ("Once upon a time", None)]
    together = greedy_outputs(engine, jobs, 8)
    assert "Paris" in engine.tokenizer.decode(together[0])
    assert together[1] != together[0]  # the adapter applies on top of the quantized base
