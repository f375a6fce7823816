"""DoRA adapters (PEFT `use_dora`), served as their own family through the family seam: the rescale op
vs its reference, adapters made by the `peft` library vs HF transformers + peft (greedy tokens and
prompt logits, with and without biases), mixed batches, upload through the admin API, malformed
files, and a quantized base (factors against the dequantized weights)."""
from __future__ import annotations

import json
import random
import shutil

import httpx
import openai
import pytest
import torch
from peft.helpers import DoraCaching
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kernels import make_lora_plan
from kernels.dora import dora_rescale, dora_rescale_reference
from server.config import EngineConfig
from server.engine.sequence import SamplingParams, Sequence
from server.families.base import ParseContext
from server.families.registry import FAMILIES, SPACES, detect_family, parse_adapter
from server.layers.context import prefill_context
from server.lora.config_schema import FamilyTag
from server.lora.peft import AdapterError
from server.models.modules import ADAPTER_MODULES, module_dims
from tests.conftest import LiveServer, greedy_outputs, make_peft_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
NEW_TOKENS = 16
LOGIT_ATOL = 2e-3  # as tests/test_oracle_parity.py: same float32 math, different op order
SKIPPED_LAYERS = (3, 17, 28)  # adapter d leaves these layers alone: where its factor rows exist there, they are zero, the identity


# -- the rescale op vs its reference -----------------------------------------------------------------

def _plan_cases():
    """(name, seg_indptr, seg_row_start, seg_rank) covering every plan path and segment kind."""
    rng = random.Random(0)
    many = [0]
    starts, ranks = [], []
    for i in range(9):  # short segments, base ones between: batched, LoRA tokens not contiguous (y_idx)
        many.append(many[-1] + rng.randint(1, 6))
        starts.append(-1 if i % 3 == 2 else 2 + 9 * (i % 4))
        ranks.append(0 if starts[-1] < 0 else 1 + i % 8)
    return [
        ("all base", [0, 5, 9], [-1, -1], [0, 0]),
        ("empty and rank 0", [0, 0, 4, 4, 7, 9], [3, 12, 0, -1, 5], [4, 0, 2, 0, 3]),
        ("loop", [0, 3, 5, 9], [0, -1, 20], [8, 0, 4]),
        ("one segment", [0, 6], [11], [3]),
        ("decode", list(range(9)), [0, 9, 18, 27, 0, 9, 18, 27], [8, 8, 8, 8, 8, 8, 8, 8]),
        ("decode, base between", list(range(9)), [0, 9, 18, 27, 0, 9, -1, 27], [8, 8, 8, 8, 8, 8, 0, 8]),
        ("batched, base between", many, starts, ranks),
        ("loop+batched", [0, 70, 72, 75, 76, 80, 81], [0, 9, -1, 18, 27, 9], [8, 4, 0, 2, 8, 4]),
        ("loop+batched, empty", [0, 2, 2, 68, 69, 71, 74, 77], [0, 30, 9, -1, 18, 27, 0], [2, 5, 4, 0, 8, 8, 2]),
    ]


@pytest.mark.parametrize("case", _plan_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_rescale_fast_op_equals_reference_and_formula(case, dtype, bias):
    _, indptr, starts, ranks = case
    plan = make_lora_plan(indptr, starts, ranks)
    g = torch.Generator().manual_seed(len(indptr))
    T, d_out, rows = indptr[-1], 24, 40
    pool = torch.rand(rows, d_out, generator=g) * 2 - 1  # g = f - 1: factors in (0, 2); junk in rows never read
    b = torch.randn(d_out, generator=g).to(dtype) if bias else None
    wide = torch.randn(T, d_out + 16, generator=g).to(dtype)  # a fused output: y is a strided slice of it
    want, got = wide.clone(), wide.clone()
    dora_rescale_reference(want[:, 8 : 8 + d_out], b, pool, plan)
    dora_rescale(got[:, 8 : 8 + d_out], b, pool, plan)
    assert torch.equal(got, want)  # both compute in float32 and round once
    # the formula, token by token: b + f ⊙ (y − b) on DoRA tokens, untouched elsewhere (the other columns too)
    direct = wide.clone().float()
    bb = torch.zeros(d_out) if b is None else b.float()
    for i, o in enumerate(starts):
        if o >= 0 and ranks[i] > 0:
            s, e = indptr[i], indptr[i + 1]
            direct[s:e, 8 : 8 + d_out] = bb + (1 + pool[o]) * (direct[s:e, 8 : 8 + d_out] - bb)
    torch.testing.assert_close(want.float(), direct.to(dtype).float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 0.02)


def test_rescale_cases_cover_every_plan_path():
    plans = [make_lora_plan(i, s, r) for _, i, s, r in _plan_cases()]
    assert {p.path for p in plans} == {"none", "loop", "batched", "loop+batched"}
    assert any(p.num_groups and p.y_range is None for p in plans) and any(p.num_groups and p.y_range for p in plans)


def test_rescale_refuses_mismatched_shapes():
    plan = make_lora_plan([0, 4], [2], [3])
    with pytest.raises(ValueError):
        dora_rescale(torch.zeros(4, 8), None, torch.zeros(4, 8), plan)  # pool shorter than the plan's rows
    with pytest.raises(ValueError):
        dora_rescale(torch.zeros(4, 8), torch.zeros(7), torch.zeros(8, 8), plan)
    with pytest.raises(ValueError):
        dora_rescale_reference(torch.zeros(5, 8), None, torch.zeros(8, 8), plan)


# -- adapters made by peft ------------------------------------------------------------------------

def make_dora_adapter(base_dir, out, seed: int, targets, magnitude_spread: float = 0.4, **config):
    """A DoRA adapter made by the peft library: random A and B (B halved, as conftest's LoRAs), and
    magnitudes moved off ‖W + sBA‖ (factors f in 1 ± magnitude_spread) so the rescale matters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(use_dora=True, init_lora_weights=False, target_modules=targets, lora_dropout=0.0, **config)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
        for name, p in model.named_parameters():  # after B: PEFT set m = ‖W + sBA‖ at init, with the unhalved B
            if "lora_magnitude_vector" in name:
                p.mul_(1 + magnitude_spread * (2 * torch.rand_like(p) - 1))
    model.save_pretrained(out)
    return out


def variant(src, out, seed: int, extra_layers=()):
    """Another DoRA adapter from `src`'s files (no peft run needed): B negated, magnitudes rescaled, and
    layer 0's modules copied into `extra_layers`."""
    out.mkdir()
    shutil.copy(src / CONFIG, out / CONFIG)
    g = torch.Generator().manual_seed(seed)
    tensors = st_load((src / WEIGHTS).read_bytes())
    for k, t in list(tensors.items()):
        if "lora_B" in k:
            tensors[k] = -t
        elif "lora_magnitude_vector" in k:
            tensors[k] = t * (0.7 + 0.6 * torch.rand(t.shape, generator=g))
    for k, t in list(tensors.items()):
        if ".layers.0." in k:
            tensors.update({k.replace(".layers.0.", f".layers.{layer}."): t.clone() for layer in extra_layers})
    (out / WEIGHTS).write_bytes(st_save(tensors))
    return out


def files_of(adapter_dir) -> dict[str, bytes]:
    return {n: (adapter_dir / n).read_bytes() for n in (CONFIG, WEIGHTS)}


@pytest.fixture(scope="module")
def dora_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    layers = [i for i in range(30) if i not in SKIPPED_LAYERS]
    d = make_dora_adapter(
        model_dir, root / "d", seed=11, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=8, lora_alpha=16,
        rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 4}, layers_to_transform=layers,
    )
    dirs = {"d": d, "l": make_peft_adapter(model_dir, root / "l", 8, ["q_proj", "k_proj", "v_proj", "gate_proj"], seed=12, scale=0.5)}
    for i in range(3):  # d2 adapts the layers d skips: there d's factor rows are zero, the identity
        dirs[f"d{i}"] = variant(d, root / f"d{i}", seed=i, extra_layers=SKIPPED_LAYERS if i == 2 else ())
    return dirs


@pytest.fixture(scope="module")
def dora_engine(model_dir, dora_dirs):
    from server.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters=dict(dora_dirs), kv_cache_tokens=2048))


def _hf(model_dir, adapter_dir):
    """HF transformers + peft on the adapter's files. Run it under peft.helpers.DoraCaching: PEFT
    otherwise recomputes every DoRA norm in every forward (the same numbers, ~3x slower)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def _run_alone(engine, ids, adapter, max_tokens=NEW_TOKENS):
    seq = Sequence(list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), adapter)
    engine.add(seq)
    while engine.has_work():
        engine.step()
    return seq.output_token_ids


def _prefill_logits(engine, ids: list[int], adapter: str) -> torch.Tensor:
    """Every prompt position's logits from a one-sequence prefill against the model, with the adapter's
    DoRA plan on every module (blocks at the end of the cache, which no sequence holds)."""
    n, bm = len(ids), engine.block_manager
    table = torch.arange(bm.num_blocks - bm.blocks_needed(n), bm.num_blocks)
    slots = torch.cat([torch.arange(b * bm.block_size, (b + 1) * bm.block_size) for b in table])[:n]
    entry = engine.adapters.get(adapter)
    assert entry.space == "dora"
    plan = make_lora_plan([0, n], [entry.row_start], [entry.rank])
    ctx = prefill_context(slots, table.tolist(), {SPACES["dora"]: {m: plan for m in ADAPTER_MODULES}})
    with torch.inference_mode():
        return engine.model.compute_logits(engine.model(torch.tensor(ids), torch.arange(n), ctx))


def test_peft_dora_adapter_equals_transformers_peft(dora_engine, model_dir, dora_dirs, monkeypatch):
    """The oracle: greedy tokens equal HF transformers + peft on the same files, and prompt logits are
    within float32 op-order noise; the rescale matters (plain LoRA math would give other logits)."""
    weights = dora_engine.parse_adapter(files_of(dora_dirs["d"]), "d")
    f = torch.cat(list(weights.factors.values()))
    assert weights.family == "dora" and (f - 1).abs().max() > 0.3  # factors far from 1
    assert weights.module_units() == {"q_proj": 8, "v_proj": 4, "o_proj": 8, "up_proj": 8, "down_proj": 8}
    assert weights.modules[(0, "down_proj")][2] == pytest.approx(4 / 8) and not any(l in SKIPPED_LAYERS for l, _ in weights.modules)
    hf = _hf(model_dir, dora_dirs["d"])
    for prompt in PROMPTS:
        ids = dora_engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad(), DoraCaching():
            ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1] :].tolist()
        assert _run_alone(dora_engine, ids[0].tolist(), "d") == ref, prompt
    ids = dora_engine.tokenizer(PROMPTS[1])["input_ids"]
    with torch.no_grad(), DoraCaching():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = _prefill_logits(dora_engine, ids, "d")
    err = (ours - ref).abs().max().item()
    assert err < LOGIT_ATOL, f"max |logit diff| = {err}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    import server.families.dora as dora_family

    monkeypatch.setattr(dora_family, "dora_rescale", lambda *args: None)  # the same A and B, as a plain LoRA
    assert (_prefill_logits(dora_engine, ids, "d") - ref).abs().max() > 100 * LOGIT_ATOL


def test_biased_model_dora_equals_transformers_peft(model_dir, tmp_path):
    """A tiny Qwen2 (random q/k/v biases, fused q/k/v slices): the rescale leaves the bias out, as PEFT does."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from server.engine.llm_engine import LLMEngine

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    base_dir = tmp_path / "base"
    hf.save_pretrained(base_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, base_dir / name)
    adapter = make_dora_adapter(base_dir, tmp_path / "d", seed=1, targets=list(ADAPTER_MODULES), r=4, lora_alpha=8)
    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=base_dir, adapters={"d": adapter}, kv_cache_tokens=512))
    oracle = _hf(base_dir, adapter)
    ids = [1, 520, 9531, 198, 4093, 314, 260, 3575, 282]
    with torch.no_grad(), DoraCaching():
        ref = oracle.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids) :].tolist()
        logits = oracle(torch.tensor([ids])).logits[0].float()
    assert _run_alone(engine, ids, "d", 20) == ref
    err = (_prefill_logits(engine, ids, "d") - logits).abs().max().item()
    assert err < 1e-4, err  # tiny model: float32 noise only


def test_mixed_batch_of_dora_lora_and_base_equals_each_alone(dora_engine, monkeypatch):
    """Four DoRA adapters, a plain LoRA and the base model in one batch: each request returns exactly
    what it returns alone; with four DoRA segments per decode step the rescale runs its batched path."""
    import server.families.dora as dora_family

    paths = set()

    def spy(y, bias, g, plan):
        paths.add(plan.path)
        dora_rescale(y, bias, g, plan)

    monkeypatch.setattr(dora_family, "dora_rescale", spy)
    jobs = [(PROMPTS[0], "d"), (PROMPTS[1], "d0"), (PROMPTS[2], "d1"), ("List three fruits:", "d2"),
            ("The quick brown fox", "l"), ("In 1492, Columbus", None), ("Write a haiku about the sea:", "d")]
    together = greedy_outputs(dora_engine, jobs, 8)
    assert "batched" in paths or "loop+batched" in paths
    for job, got in zip(jobs, together):
        assert got == greedy_outputs(dora_engine, [job], 8)[0], job


# -- detection and malformed files --------------------------------------------------------------

def test_detection_claims_use_dora_and_hotswap_family():
    dora, lora = FAMILIES["dora"].claims, FAMILIES["lora"].claims
    assert dora(FamilyTag(use_dora=True)) and not lora(FamilyTag(use_dora=True))
    assert dora(FamilyTag(hotswap_family="dora")) and not lora(FamilyTag(hotswap_family="dora"))
    assert not dora(FamilyTag()) and not dora(FamilyTag(use_dora=False)) and lora(FamilyTag(use_dora=False))
    assert not dora(FamilyTag(peft_type="MIXLORA", use_dora=True)) and not dora(FamilyTag(hotswap_family="lora", use_dora=True))
    assert detect_family({CONFIG: b'{"peft_type": "LORA", "use_dora": true}'}, "t/a").name == "dora"


def _edit(files, edit=None, **config):
    tensors = dict(st_load(files[WEIGHTS]))
    if edit is not None:
        edit(tensors)
    raw = json.loads(files[CONFIG])
    raw.update(config)
    return {CONFIG: json.dumps(raw).encode(), WEIGHTS: st_save(tensors)}


MAG = "base_model.model.model.layers.{}.self_attn.q_proj.lora_magnitude_vector"
BAD = {
    "missing magnitude": (lambda t: t.pop(MAG.format(0)), r"layer 0 q_proj: a DoRA module needs a floating point lora_magnitude_vector \(576,\), got none"),
    "wrong shape": (lambda t: t.__setitem__(MAG.format(1), torch.ones(575)), r"lora_magnitude_vector \(576,\), got torch.float32 \(575,\)"),
    "integer magnitude": (lambda t: t.__setitem__(MAG.format(1), torch.ones(576, dtype=torch.int32)), r"got torch.int32"),
    "NaN magnitude": (lambda t: t[MAG.format(2)].__setitem__(5, float("nan")), r"NaN or infinite"),
    "magnitude without A/B": (lambda t: t.__setitem__(MAG.format(SKIPPED_LAYERS[0]), torch.ones(576)), r"has a lora_magnitude_vector but no lora_A/lora_B"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_dora_files_are_refused(dora_engine, dora_dirs, case):
    edit, match = BAD[case]
    with pytest.raises(AdapterError, match=match) as e:
        dora_engine.parse_adapter(_edit(files_of(dora_dirs["d"]), edit), "t/a")
    assert str(e.value).startswith("t/a: ")


def test_dora_refusals_of_the_seam(dora_engine, dora_dirs):
    files = files_of(dora_dirs["d"])
    cfg = dora_engine.model.config
    with pytest.raises(AdapterError, match="t/a: a DoRA adapter's factors need the base model's weights"):
        parse_adapter(files, "t/a", cfg, torch.float32, 64)  # no base weights to norm against
    with pytest.raises(AdapterError, match="the files are a dora adapter, not lora"):
        dora_engine.parse_adapter(files, "t/a", "lora")
    with pytest.raises(AdapterError, match="not a DoRA adapter"):
        dora_engine.parse_adapter(_edit(files, hotswap_family="dora", use_dora=False), "t/a")
    # a row of W + sBA that is all zeros has no norm to divide by
    zero_b = _edit(files, lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", torch.zeros(576, 8)))
    zeros = lambda layer, module: torch.zeros(module_dims(cfg, module)[::-1])  # noqa: E731  (d_out, d_in)
    with pytest.raises(AdapterError, match=r"t/a: layer 0 q_proj: output channel 0 of W \+ sBA is all zeros"):
        FAMILIES["dora"].parse(zero_b, "t/a", ParseContext(cfg, torch.float32, 64, zeros))
    # ... and one whose norm is tiny next to its magnitude gives a factor beyond float32
    def tiny(t):
        t["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"] *= 1e-15
        t[MAG.format(2)][5] = 1e30

    with pytest.raises(AdapterError, match=r"t/a: layer 2 q_proj: DoRA's factor m / ‖W \+ sBA‖ overflows float32 at output channel 5"):
        FAMILIES["dora"].parse(_edit(files, tiny), "t/a", ParseContext(cfg, torch.float32, 64, zeros))
    # plain LoRA files are no DoRA adapter, even when the family is forced
    plain = files_of(dora_dirs["l"])
    assert detect_family(plain, "t/a").name == "lora"
    with pytest.raises(AdapterError, match="the files are a lora adapter, not dora"):
        dora_engine.parse_adapter(plain, "t/a", "dora")


# -- the admin API ----------------------------------------------------------------------------------

def test_upload_detects_dora_and_serves_it_over_http(model_dir, dora_dirs, dora_engine, tmp_path):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=1024, served_model_name="smollm2"))
    service = build_adapter_service(engine, str(tmp_path / "store"), None, tmp_path / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, api_key="admin", adapter_service=service)) as srv:
        admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": "Bearer admin"}, timeout=120)
        assert admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 201
        key = admin.post("/admin/v1/tenants/acme/keys").json()["key"]
        upload = lambda name, files, **f: admin.post("/admin/v1/adapters", data={"tenant": "acme", "name": name, **f},  # noqa: E731
                                                      files={k: (k, v) for k, v in files.items()})
        r = upload("dora", files_of(dora_dirs["d"]))
        assert r.status_code == 201, r.text
        m = r.json()
        assert m["family"] == "dora" and m["ranks"] == {"down_proj": 8, "o_proj": 8, "q_proj": 8, "up_proj": 8, "v_proj": 4}
        r = upload("forced", files_of(dora_dirs["d"]), family="lora")
        assert r.status_code == 400 and "not lora" in r.text
        r = upload("broken", _edit(files_of(dora_dirs["d"]), BAD["missing magnitude"][0]))
        assert r.status_code == 400 and "lora_magnitude_vector" in r.text
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key=key, max_retries=0, timeout=120)
        got = client.completions.create(model="dora", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
        assert admin.get("/admin/v1/adapters/acme/dora").json()["residency"]["device"] is True
    # the static engine serves the very same files
    ids = dora_engine.tokenizer(PROMPTS[0])["input_ids"]
    seq = Sequence(ids, SamplingParams(max_tokens=12, temperature=0.0), "d")
    dora_engine.add(seq)
    while dora_engine.has_work():
        dora_engine.step()
    assert got == dora_engine.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)


# -- a quantized base --------------------------------------------------------------------------------

def _g_rows(engine, adapter):
    """(layer, module) -> the adapter's g = f - 1 row in the DoRA pools (None: the module has no DoRA pools)."""
    entry = engine.adapters.get(adapter)
    out = {}
    for i, layer in enumerate(engine.model.layers):
        for m in ("q_proj", "v_proj", "down_proj"):
            pools = layer.adapter_targets()[m].slots[m].pools
            out[(i, m)] = pools["dora_g"][entry.row_start].clone() if "dora_g" in pools else None
    return out


def test_quantized_base_norms_against_the_dequantized_weights(model_dir, dora_dirs, dora_engine):
    """An int8 engine's DoRA factors are those of a float32 engine whose base weights are the int8
    engine's dequantized weights (exactly), not those of the original weights; both engines give the
    same greedy tokens up to bf16 near-ties."""
    from server.engine.llm_engine import LLMEngine
    from tests.test_quantization import _next_token_logits

    quant = LLMEngine(EngineConfig(model=model_dir, adapters={"d": dora_dirs["d"]}, kv_cache_tokens=1024, quantization="int8"))
    dense = LLMEngine(EngineConfig(model=model_dir, kv_cache_tokens=1024, quantization="none"))
    for lq, ld in zip(quant.model.layers, dense.model.layers):
        for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            getattr(ld, name).weight.data.copy_(getattr(lq, name).quant.dequantize())
    dense.model.embed_tokens.weight.data.copy_(quant.model.embed_quant.dequantize())
    dense.load_adapter("d", dora_dirs["d"])  # after the weights: its factors are normed against them
    gq, gd, gf = _g_rows(quant, "d"), _g_rows(dense, "d"), _g_rows(dora_engine, "d")
    for layer, module in [k for k in gq if k[0] in SKIPPED_LAYERS]:  # not adapted: no DoRA pools there ...
        assert gq.pop((layer, module)) is None and gd.pop((layer, module)) is None
        assert not gf[(layer, module)].any()  # ... or, where another adapter (d2) has them, d's zero row: the identity
    assert all(torch.equal(gq[k], gd[k]) for k in gq)
    assert not all(torch.equal(gq[k], gf[k]) for k in gq)  # the original float weights give other factors
    jobs = [(PROMPTS[0], "d"), (PROMPTS[2], "d"), ("1, 2, 3, 4,", None)]
    for (prompt, adapter), q, d in zip(jobs, greedy_outputs(quant, jobs, 12), greedy_outputs(dense, jobs, 12)):
        if q != d:  # allowed only where bf16 rounding of the base GEMMs' activations can flip a near-tie
            i = next(i for i, (a, b) in enumerate(zip(q, d)) if a != b)
            ids = quant.tokenizer(prompt)["input_ids"] + d[:i]
            lq, ld = _next_token_logits(quant, ids, adapter), _next_token_logits(dense, ids, adapter)
            noise = (lq - ld).abs().max().item()
            assert noise < 1.0, noise
            assert ld[d[i]] - ld[q[i]] <= 2 * noise, (prompt, i, noise)
