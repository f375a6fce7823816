"""The quantized base off the CPU: the Triton int8 GEMM, tinygemm int4 layout, device-aware quantize_model.

No GPU here, so: the Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors against
int8_linear_reference, and is compiled for sm_90 (ptxas must report no spills); the CUDA placement
runs on the `meta` device, which has the tinygemm layout and runs the ops' meta kernels, so shapes
and dtypes flow as on CUDA and nothing lands on the CPU by mistake.

Tolerance of the Triton op: the same float32 products and sums as the reference in another order,
then one rounding to the output dtype, so one ulp of that dtype at the output's magnitude.
"""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.quant as kq  # noqa: E402
from kernels.quant import (  # noqa: E402
    Int4Weight, Int8Weight, int4_codes, int4_linear, int8_linear, int8_linear_reference, kernel_for, quantize_int4,
    quantize_int8,
)
from server.layers.linear import AdaptedLinear  # noqa: E402
from server.models.config import ModelConfig  # noqa: E402
from server.models.llama import LlamaForCausalLM  # noqa: E402
from server.models.quantize import describe_kernels, quantize_model, resolve_quantization, weight_bytes  # noqa: E402

META = torch.device("meta")
ULP = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # relative; fp32: sums in another order
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
NO_PLANS = SimpleNamespace(plans={}, hooks=[], lora_segs=None)  # what AdaptedLinear reads of a ForwardContext: no adapter in the step


def triton_quant():
    pytest.importorskip("triton")
    from kernels.triton import quant

    if not quant.INTERPRET:
        pytest.skip("kernels.triton was imported before TRITON_INTERPRET=1 was set")
    return quant


def assert_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= ULP[want.dtype] * want.float().abs().max().item() + 1e-6, err


# ------------------------------------------------------------------------------------ Triton int8 GEMM


@DTYPES
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_triton_int8_gemm_matches_reference(rows: int, dtype: torch.dtype, bias: bool) -> None:
    """Odd N and K (every mask), decode-sized batches (split-K, atomics) and a larger one (tile stores)."""
    quant = triton_quant()
    g = torch.Generator().manual_seed(rows)
    w = quantize_int8(torch.randn(45, 37, generator=g))
    b = torch.randn(45, generator=g).to(dtype) if bias else None
    x = torch.randn(rows, 37, generator=g).to(dtype)
    assert (rows <= quant.SPLIT_K_MAX_ROWS) == (rows in (1, 5))
    assert_one_ulp(quant.int8_linear_triton(x, w, b), int8_linear_reference(x, w, b))


def test_triton_int8_gemm_takes_strided_and_batched_inputs() -> None:
    quant = triton_quant()
    g = torch.Generator().manual_seed(7)
    w = quantize_int8(torch.randn(40, 24, generator=g))
    wide = torch.randn(6, 48, generator=g, dtype=torch.float32).to(torch.bfloat16)
    x = wide[:, ::2]  # column stride 2
    assert_one_ulp(quant.int8_linear_triton(x, w), int8_linear_reference(x, w))
    x3 = torch.randn(2, 3, 24, generator=g)
    y3 = quant.int8_linear_triton(x3, w)
    assert y3.shape == (2, 3, 40)
    assert_one_ulp(y3.view(6, 40), int8_linear_reference(x3.view(6, 24), w))
    assert quant.int8_linear_triton(torch.zeros(0, 24), w).shape == (0, 40)


def test_int8_linear_dispatches_to_the_triton_op(monkeypatch) -> None:
    """The wiring int8_linear uses on CUDA (lazy import, argument order), run on CPU tensors under the interpreter."""
    triton_quant()
    monkeypatch.setattr(kq, "kernel_for", lambda fmt, device, rows: "triton-int8")
    g = torch.Generator().manual_seed(8)
    w, b = quantize_int8(torch.randn(30, 20, generator=g)), torch.randn(30, generator=g)
    x = torch.randn(4, 20, generator=g)
    assert_one_ulp(int8_linear(x, w, b), int8_linear_reference(x, w, b))


def test_warmup_launches_once_per_shape_and_row_bucket() -> None:
    quant = triton_quant()
    g = torch.Generator().manual_seed(9)
    a, b = quantize_int8(torch.randn(24, 40, generator=g)), quantize_int8(torch.randn(40, 24, generator=g))
    assert quant.warmup([a, b, a], torch.bfloat16, max_rows=70) == 2 * 4  # row buckets 16, 32, 64, 128
    assert quant.warmup([a], torch.float32, max_rows=1) == 1


def test_m_bucket_keys_few_autotune_entries() -> None:
    quant = triton_quant()
    assert [quant.m_bucket(m) for m in (0, 1, 16, 17, 33, 1000, 5000)] == [16, 16, 16, 32, 64, 1024, 1024]


# Compiles the largest config of each tile class down to sm_90 (the triton wheel bundles ptxas) and
# asks ptxas for its spills: code only the GPU compiler sees (MMA layouts, the int8 conversion,
# split-K atomics) is checked here too. Runs without TRITON_INTERPRET, in a subprocess.
AOT_CHECK = r"""
import re, sys
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.triton import quant as Q
assert not Q.INTERPRET
knobs.nvidia.dump_ptxas_log = True
fn = Q._int8_gemm.fn
cases = [("*bf16", Q.WIDE_TILES, 1), ("*fp32", Q.WIDE_TILES_FP32, 1), ("*bf16", Q.SPLIT_TILES, 8), ("*fp16", Q.SPLIT_TILES, 8),
         ("*fp32", Q.SPLIT_TILES_FP32, 8)]
for xt, tiles, split in cases:
    bm, bn, bk, nw, ns = max(tiles, key=lambda t: t[0] * t[1] * t[2] / t[3])
    c = dict(HAS_BIAS=True, PRECISION="ieee" if xt == "*fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SPLIT_K=split)
    types = {"x_ptr": xt, "q_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": xt, "y_ptr": "*fp32" if split > 1 else xt}
    sig = {n: "constexpr" if n in c else types.get(n, "i32") for n in fn.arg_names}
    try:
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": nw, "num_stages": ns})
    except Exception as e:
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            sys.exit(77)
        raise
    assert out.asm["cubin"]
    print("CASE", xt, c, flush=True)
"""


def test_int8_gemm_compiles_for_sm90_without_spills(tmp_path) -> None:
    triton_quant()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cached kernel would skip ptxas, and its spill report
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", AOT_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip("triton's ptxas is not available")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("CASE") == 5, r.stdout[-2000:]
    spills = [int(n) for n in __import__("re").findall(r"(\d+) bytes spill stores", r.stdout)]
    assert len(spills) == 5 and not any(spills), r.stdout[-4000:]


# ------------------------------------------------------------------------------ kernels by device


def test_kernel_for_each_device(monkeypatch) -> None:
    assert kernel_for("int8", "cpu", 1) == "int8pack" and kernel_for("int8", "cpu", kq.PACKED_MAX_ROWS + 1) == "dequant"
    assert kernel_for("int4", "cpu", 1) == "int4pack"
    assert kernel_for("int8", "meta", 1) == "dequant"  # a Triton kernel cannot launch on meta
    assert kernel_for("int4", "meta", 1) == kernel_for("int4", "cuda", 1) == "tinygemm"
    monkeypatch.setattr(kq, "_triton_available", lambda: True)
    assert kernel_for("int8", "cuda:0", 1) == kernel_for("int8", "cuda", 4096) == "triton-int8"
    monkeypatch.setattr(kq, "_triton_available", lambda: False)
    assert kernel_for("int8", "cuda", 1) == "dequant"


def test_health_names_the_kernels_each_device_runs(monkeypatch) -> None:
    cpu = describe_kernels(torch.device("cpu"), "int8", 32, "torch-cpu")
    assert "int8pack" in cpu["base"] and "dequantize" in cpu["base"] and "int8pack" in cpu["lm_head"]
    assert "_for_cpu" in describe_kernels("cpu", "int4", 64, "torch-cpu")["base"]
    monkeypatch.setattr(kq, "_triton_available", lambda: True)
    cuda = describe_kernels(torch.device("cuda", 0), "int8", 32, "triton")
    assert "Triton int8 GEMM" in cuda["base"] and "Triton int8 GEMM" in cuda["lm_head"] and "on cuda" in cuda["adapters"]
    int4 = describe_kernels("cuda", "int4", 128, "triton")
    assert "tinygemm" in int4["base"] and "group 128" in int4["base"] and "Triton" in int4["lm_head"]
    monkeypatch.setattr(kq, "_triton_available", lambda: False)
    assert "triton does not import" in describe_kernels("cuda", "int8", 32, "torch")["base"]
    meta = describe_kernels(META, "int4", 32, "torch")
    assert "tinygemm" in meta["base"] and "shapes only" in meta["base"] and "dequantize" in meta["lm_head"]
    assert describe_kernels("cuda", "none", 32, "triton")["base"] == "none: dense GEMM (torch)"


def test_auto_quantization_keeps_one_int8_base_on_the_gpu() -> None:
    assert resolve_quantization("auto", torch.device("cpu")) == "w8a8"
    assert resolve_quantization("auto", torch.device("cuda", 1)) == "int8"
    assert resolve_quantization("auto", "meta") == "int8"  # meta stands for CUDA in the placement test
    assert resolve_quantization("int4", torch.device("cuda")) == "int4"
    assert resolve_quantization("none", torch.device("cuda")) == "none"


# ---------------------------------------------------------------------------- int4 tinygemm layout


@pytest.mark.parametrize("k, tiles", [(256, 8), (192, 4), (96, 2)])
def test_int4_on_meta_has_the_tinygemm_layout(k: int, tiles: int) -> None:
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(k))
    q = quantize_int4(w, 32, device="meta")
    assert q.packed.device == META and q.packed.dtype == torch.int32
    assert q.packed.shape == (64 // 8, k // (16 * tiles), 32, tiles // 2)
    assert q.scale_zero.device == META and q.scale_zero.dtype == torch.bfloat16 and q.scale_zero.shape == (k // 32, 64, 2)
    assert q.shape == (64, k) and q.device == META
    assert q.nbytes < w.numel() * 0.7  # the same bytes as the CPU layout: half a byte per code + scales
    assert q.nbytes == quantize_int4(w, 32).nbytes


def test_int4_tinygemm_refuses_shapes_it_has_no_kernel_for() -> None:
    codes = int4_codes(torch.randn(60, 64), 32)
    with pytest.raises(ValueError, match="tinygemm.*N=60"):
        Int4Weight.from_codes(*codes, 32, device="meta")
    with pytest.raises(ValueError, match="tinygemm.*group 16"):
        Int4Weight.from_codes(*int4_codes(torch.randn(64, 48), 16), 16, device="meta")  # no tinygemm build for 16
    with pytest.raises(ValueError, match="cpu or cuda"):
        Int4Weight.from_codes(*codes, 32, device="mps")


@DTYPES
@pytest.mark.parametrize("rows", [0, 1, 9])
def test_int4_linear_runs_on_meta(rows: int, dtype: torch.dtype) -> None:
    q = quantize_int4(torch.randn(96, 128), 32, device="meta")
    bias = torch.zeros(96, dtype=dtype, device="meta")
    y = int4_linear(torch.empty(rows, 128, dtype=dtype, device="meta"), q, bias)
    assert y.device == META and y.dtype == dtype and y.shape == (rows, 96)
    w = q.dequantize(dtype)
    assert w.device == META and w.dtype == dtype and w.shape == (96, 128)
    with pytest.raises(RuntimeError, match="tinygemm takes x"):
        int4_linear(torch.empty(rows, 64, dtype=dtype, device="meta"), q)


def test_int8_runs_on_meta() -> None:
    q = quantize_int8(torch.randn(50, 24), device="meta")
    assert q.q.device == q.scale.device == META and q.q.dtype == torch.int8 and q.scale.dtype == torch.float32
    y = int8_linear(torch.empty(3, 24, dtype=torch.bfloat16, device="meta"), q, torch.zeros(50, dtype=torch.bfloat16, device="meta"))
    assert y.device == META and y.dtype == torch.bfloat16 and y.shape == (3, 50)
    rows = q.rows(torch.tensor([1, 4], device="meta"), torch.bfloat16)
    assert rows.device == META and rows.shape == (2, 24)


def test_quantizing_to_the_weights_device_keeps_the_cpu_results() -> None:
    """device=None and device="cpu" give today's CPU tensors: same codes, scales and outputs."""
    w, x = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)), torch.randn(5, 96)
    a, b = quantize_int8(w), quantize_int8(w, device="cpu")
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(int8_linear(x, a), int8_linear(x, b))
    c, d = quantize_int4(w, 32), quantize_int4(w, 32, device=torch.device("cpu"))
    assert c.packed.shape == (64, 48) and c.packed.dtype == torch.uint8
    assert torch.equal(c.packed, d.packed) and torch.equal(c.scale_zero, d.scale_zero)
    assert torch.equal(int4_linear(x, c), int4_linear(x, d))


# ----------------------------------------------------------------------- quantize_model to a device


def tiny_model(tied: bool) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, on the CPU, its shapes inside tinygemm's (N % 8, K % 32)."""
    cfg = ModelConfig(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                      max_position_embeddings=64, tie_word_embeddings=tied, attention_bias=True, mlp_bias=False,
                      bos_token_id=None, eos_token_ids=(0,))
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg, torch.bfloat16, 64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def quantized_tensors(model: LlamaForCausalLM) -> list[torch.Tensor]:
    out = []
    for q in [model.embed_quant, model.lm_head_quant] + [lin.quant for layer in model.layers for lin in layer.linears()]:
        out += [q.q, q.scale] if isinstance(q, Int8Weight) else [q.packed, q.scale_zero]
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantize_model_to_meta_places_everything_there_and_runs(mode: str, tied: bool) -> None:
    """Codes computed on the host, quantized tensors placed on meta in its kernel layout, dense weights
    released; after model.to("meta") no tensor of the model is left on the CPU, and the quantized
    parts run on meta: the embedding lookup, every decoder linear (fused q/k/v with its bias), the
    norms, the lm_head."""
    model = tiny_model(tied)
    dense = weight_bytes(model)
    quantize_model(model, mode, 32, progress=False, device="meta")
    assert model.embed_tokens.weight is None and model.lm_head_weight is None
    assert (model.embed_quant is model.lm_head_quant) == tied
    assert all(lin.weight is None for layer in model.layers for lin in layer.linears())
    assert all(t.device == META for t in quantized_tensors(model))
    if mode == "int4":
        assert all(lin.quant.packed.dim() == 4 for layer in model.layers for lin in layer.linears())  # tinygemm layout
    assert weight_bytes(model) < dense  # counted on meta as on any device
    model.to(META)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device != META]
    assert not leftovers, leftovers

    cfg, t = model.config, 7
    x = model.embed_quant.rows(torch.zeros(t, dtype=torch.long, device=META), model.dtype)
    for layer in model.layers:
        qkv = layer.qkv_proj(layer.input_layernorm(x), NO_PLANS)
        assert qkv.shape == (t, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
        x = x + layer.o_proj(qkv[:, : layer.q_size], NO_PLANS)  # attention's output has q's width
        gate_up = layer.gate_up_proj(layer.post_attention_layernorm(x), NO_PLANS)
        x = x + layer.down_proj(gate_up[:, : layer.intermediate_size], NO_PLANS)
    logits = model.compute_logits(model.norm(x))
    assert logits.device == META and logits.dtype == torch.float32 and logits.shape == (t, cfg.vocab_size)


def test_an_adapted_linear_quantized_to_meta_serves_meta_inputs() -> None:
    lin = AdaptedLinear(64, {"q_proj": 64, "v_proj": 32}, bias=True, dtype=torch.bfloat16)
    lin.weight.data.normal_()
    lin.quantize(quantize_int4(lin.weight.detach(), 64, device="meta"))
    lin.bias = torch.nn.Parameter(lin.bias.to("meta"), requires_grad=False)
    y = lin(torch.empty(5, 64, dtype=torch.bfloat16, device="meta"), NO_PLANS)
    assert y.device == META and y.shape == (5, 96) and y.dtype == torch.bfloat16


def test_quantize_model_none_leaves_the_model_alone() -> None:
    model = tiny_model(True)
    before = weight_bytes(model)
    quantize_model(model, "none", progress=False, device="meta")
    assert model.embed_quant is None and model.embed_tokens.weight.device.type == "cpu" and weight_bytes(model) == before
