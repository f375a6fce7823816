"""Hostile adapter uploads: every malformed config or tensor of every family is an AdapterError (HTTP 400
`invalid_adapter`) with a message that says what is wrong, quickly; none freezes or crashes the server."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from loadtests.synthetic import lora_files, mixlora_files, reclora_files, s2ft_files
from server.families.registry import parse_adapter
from server.families.moe import parse_mixlora
from server.families.reclora import parse_reclora
from server.families.s2ft import parse_s2ft
from server.lora.peft import AdapterError, parse_peft_lora
from server.models.config import ModelConfig

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_RANK = 32
RANK = 4  # every synthetic LoRA here: q_proj and v_proj of every layer, rank 4
Q = "base_model.model.model.layers.0.self_attn.q_proj"
# Regexes Python's backtracking `re` takes minutes (or forever) to fail on module names such as
# model.layers.12.self_attn.v_proj (nested quantifiers); RE2 answers each in microseconds.
CATASTROPHIC = ["(.*.*)*!", r"([\w.]+)+!", r"(\w*\.?)*!", r"(m?o?d?e?l?.*)*\.q_proj!"]


@pytest.fixture(scope="module")
def cfg(model_dir) -> ModelConfig:
    return ModelConfig.from_dir(model_dir)


@pytest.fixture(scope="module")
def good(cfg) -> dict[str, dict[str, bytes]]:
    """One small valid adapter of each family, as upload files."""
    g = torch.Generator().manual_seed(0)
    return {
        "lora": lora_files(cfg, g, rank=RANK),
        "moe-lora": mixlora_files(cfg, g, experts=2, top_k=1, rank=RANK),
        "reclora": reclora_files(cfg, g, k=4, rank=RANK),
        "s2ft": s2ft_files(cfg, g),
    }


def parse(files, cfg):
    return parse_adapter(files, "t/a", cfg, torch.float32, MAX_RANK)


def with_config(files, **changes) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def with_tensors(files, edit) -> dict[str, bytes]:
    tensors = dict(st_load(files[WEIGHTS]))
    edit(tensors)
    return {**files, WEIGHTS: st_save(tensors)}


def setitem(key, value):
    return lambda t: t.__setitem__(key, value)


def poke(key, value, index=(0, 0)):
    """Write one entry of an existing tensor."""
    return lambda t: t[key].__setitem__(index, value)


def refused(files, cfg, match, parser=parse) -> str:
    """Parsing raises AdapterError matching `match`, within 2 s, with a bounded message naming the adapter."""
    start = time.perf_counter()
    with pytest.raises(AdapterError, match=match) as e:
        parser(files, cfg)
    assert time.perf_counter() - start < 2
    message = str(e.value)
    assert message.startswith("t/a: ") and "Traceback" not in message and len(message) < 1000
    return message


# ---------- regexes from the config: RE2, linear time, compiled once ----------

@pytest.mark.parametrize("pattern", CATASTROPHIC)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_catastrophic_pattern_that_matches_nothing_loads_in_linear_time(good, cfg, field, pattern):
    start = time.perf_counter()
    weights = parse(with_config(good["lora"], **{field: {pattern: RANK}}), cfg)
    assert time.perf_counter() - start < 2
    assert weights.modules[(0, "q_proj")][2] == pytest.approx(1.0)  # the pattern matched nothing: default alpha / r


def test_catastrophic_pattern_that_matches_is_applied(good, cfg):
    # an alternation Python would backtrack through before reaching `q_proj`
    refused(with_config(good["lora"], rank_pattern={f"{CATASTROPHIC[0]}|q_proj": 2}), cfg, r"layer 0 q_proj has rank 4 but the config declares 2")
    w = parse(with_config(good["lora"], alpha_pattern={f"{CATASTROPHIC[1]}|self_attn\\.v_proj": 8}), cfg)
    assert w.modules[(3, "v_proj")][2] == pytest.approx(2.0) and w.modules[(3, "q_proj")][2] == pytest.approx(1.0)


def test_patterns_pick_what_peft_picks():
    """RE2 runs PEFT's own regex (peft.utils.other.get_pattern_key): the first pattern matching the key or a dotted suffix."""
    from peft.utils.other import get_pattern_key

    from server.lora.peft import _pattern_value, compile_patterns

    patterns = [
        "q_proj", "layers.3.self_attn.q_proj", r"layers\.1\d\.mlp\..*", "model.layers.1.self_attn.k_proj", "(gate|up)_proj",
        "self_attn", r"^model\.layers\.2\..*", "attn.v_proj", ".*down_proj", "layers.2", r"o_pr\w+", "s.o_proj", "",
    ]
    for order in (patterns, patterns[::-1]):
        ranks = {p: i + 1 for i, p in enumerate(order)}
        compiled = compile_patterns(ranks, "t", "rank_pattern")
        for layer in (0, 1, 2, 3, 12, 29):
            for block, module in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                                  ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
                key = f"model.layers.{layer}.{block}.{module}"
                assert _pattern_value(compiled, key, None) == ranks.get(get_pattern_key(ranks.keys(), key)), key


NOT_RE2 = {
    "unbalanced": "(",
    "lookahead": "(?=q)q_proj",
    "lookbehind": "(?<=self_attn\\.)q_proj",
    "backreference": "(q)\\1_proj",
    "huge counted repetition": "(a{1000}){1000}",
    "program over RE2's size limit": r"\p{L}{100}",
    "trailing backslash": "q_proj\\",
}


@pytest.mark.parametrize("case", sorted(NOT_RE2))
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_re2_cannot_compile_is_refused_quickly(good, cfg, field, case):
    message = refused(with_config(good["lora"], **{field: {NOT_RE2[case]: RANK}}), cfg, rf"{field} key .* must be an RE2 regex")
    assert "linear time" in message and "re.error" not in message


def test_pattern_size_and_count_are_bounded(good, cfg):
    refused(with_config(good["lora"], rank_pattern={"a" * 1001: RANK}), cfg, r"rank_pattern must be .*at most 1000 characters")
    many = {f"layers\\.{i}\\.nothing": RANK for i in range(1025)}
    refused(with_config(good["lora"], alpha_pattern=many), cfg, r"alpha_pattern must be .*at most 1024")
    # the most patterns allowed, against every adapted module, still load quickly
    start = time.perf_counter()
    parse(with_config(good["lora"], rank_pattern=dict(list(many.items())[:1024])), cfg)
    assert time.perf_counter() - start < 2


def test_a_target_modules_regex_is_only_type_checked(good, cfg):
    # hotswap serves the modules the tensors hold and never matches target_modules, so a lookaround
    # regex written for PEFT's `re` (common for multimodal models) keeps loading
    parse(with_config(good["lora"], target_modules=r"^(?!.*vision).*\.(q_proj|v_proj)"), cfg)
    refused(with_config(good["lora"], target_modules=["q_proj", 5]), cfg, r"target_modules must be .*target_modules\[1\] got 5")


# ---------- config types and ranges ----------

BAD_LORA_CONFIG = {
    "string lora_alpha": ({"lora_alpha": "16"}, r"lora_alpha must be a finite number: lora_alpha got '16'"),
    "bool lora_alpha": ({"lora_alpha": True}, r"lora_alpha must be a finite number"),
    "infinite lora_alpha": ({"lora_alpha": 1e400}, r"lora_alpha must be a finite number"),
    "NaN lora_alpha": ({"lora_alpha": float("nan")}, r"lora_alpha must be a finite number"),
    "string r": ({"r": "4"}, r"r must be a positive integer: r got '4'"),
    "float r": ({"r": 4.0}, r"r must be a positive integer"),
    "bool r": ({"r": True}, r"r must be a positive integer"),
    "zero r": ({"r": 0}, r"r got 0 \(Input should be greater than or equal to 1\)"),
    "negative r": ({"r": -4}, r"r got -4"),
    "huge r": ({"r": 10**30}, r"config declares 1000000000000000000000000000000"),  # the tensors' rank is what counts
    "list rank_pattern": ({"rank_pattern": ["q_proj"]}, r"rank_pattern must be an object .*got \['q_proj'\]"),
    "string rank": ({"rank_pattern": {"q_proj": "4"}}, r"rank_pattern\['q_proj'\] got '4'"),
    "float rank": ({"rank_pattern": {"q_proj": 4.5}}, r"rank_pattern\['q_proj'\] got 4.5"),
    "rank above max": ({"rank_pattern": {"q_proj": 64}}, r"config declares 64"),
    "string alpha": ({"alpha_pattern": {"v_proj": "8"}}, r"alpha_pattern\['v_proj'\] got '8'"),
    "string use_rslora": ({"use_rslora": "true"}, r"use_rslora must be true or false: use_rslora got 'true'"),
    "int use_dora": ({"use_dora": 1}, r"use_dora must be true or false"),
    "numeric target_modules": ({"target_modules": 5}, r"target_modules must be a list of module names or one regex"),
    "string modules_to_save": ({"modules_to_save": "lm_head"}, r"modules_to_save must be null or a list"),
    "list peft_type": ({"peft_type": ["LORA"]}, r"peft_type must be a string"),
    "numeric hotswap_family": ({"hotswap_family": 5}, r"hotswap_family must be a string"),
    "lone surrogate pattern": ({"rank_pattern": {"\ud800": 4}}, r"rank_pattern .*valid Unicode"),
    "alpha overflowing float32": ({"lora_alpha": 1e300}, r"lora_B: values up to .* overflow torch.float32"),
    # refusals kept from before
    "dora": ({"use_dora": True}, r"DoRA|use_dora"),  # served by the dora family when there is one, never as plain LoRA
    "bias": ({"bias": "all"}, r"bias='all'"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, r"modules_to_save .* is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_LORA_CONFIG))
def test_bad_lora_config_is_refused_naming_the_field(good, cfg, case):
    changes, match = BAD_LORA_CONFIG[case]
    refused(with_config(good["lora"], **changes), cfg, match)


def test_a_declared_default_rank_above_the_limit_is_fine_when_no_tensor_uses_it(good, cfg):
    """--max-lora-rank bounds the ranks the tensors have, not a default that rank_pattern overrides everywhere."""
    weights = parse(with_config(good["lora"], r=MAX_RANK * 4, rank_pattern={".*": RANK}), cfg)
    assert weights.rank == RANK


BAD_RAW_CONFIG = {
    "100,000 nested lists": (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply"),
    "deeply nested field": (b'{"r": 4, "task_type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", r"nested too deeply"),
    "5,000-digit integer": (b'{"r": ' + b"9" * 5000 + b"}", r"not valid JSON"),
    "not UTF-8": (b'{"r": "\xff"}', r"not valid JSON"),
}
# each family's own parser, as well as parse_adapter (which detects the family first)
PARSERS = {
    "lora": lambda files, cfg: parse_peft_lora(files, "t/a", cfg, torch.float32, MAX_RANK),
    "moe-lora": lambda files, cfg: parse_mixlora(files, "t/a", cfg, torch.float32, MAX_RANK),
    "reclora": lambda files, cfg: parse_reclora(files, "t/a", cfg, MAX_RANK),
    "s2ft": lambda files, cfg: parse_s2ft(files, "t/a", cfg, torch.float32),
    "detected": parse,
}


@pytest.mark.parametrize("case", sorted(BAD_RAW_CONFIG))
@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_config_that_is_no_json_object_is_refused(good, cfg, case, parser):
    raw, match = BAD_RAW_CONFIG[case]
    family = "lora" if parser == "detected" else parser
    refused({**good[family], CONFIG: raw}, cfg, match, PARSERS[parser])


def test_a_config_written_by_peft_loads(good, cfg, tmp_path):
    """Real PEFT configs carry dozens of fields hotswap ignores; patterns and regex target_modules keep PEFT's meaning."""
    from peft import LoraConfig

    LoraConfig(
        r=RANK, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)", lora_dropout=0.05, task_type="CAUSAL_LM",
        rank_pattern={"layers.3.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3},
    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert {"task_type", "lora_dropout", "fan_in_fan_out", "init_lora_weights", "layers_to_transform", "revision"} <= set(config)
    files = with_tensors({**good["lora"], CONFIG: json.dumps(config).encode()}, lambda t: (
        t.__setitem__("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight", t["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"][:2].clone()),
        t.__setitem__("base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight", t["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"][:, :2].clone()),
    ))
    w = parse(files, cfg)
    assert w.modules[(3, "q_proj")][0].shape[0] == 2 and w.modules[(3, "q_proj")][2] == pytest.approx(8 / 2)
    assert w.modules[(0, "v_proj")][2] == pytest.approx(3 / RANK) and w.modules[(0, "q_proj")][2] == pytest.approx(8 / RANK)


BAD_FAMILY_CONFIG = {
    ("moe-lora", "string num_experts"): ({"num_experts": "2"}, r"num_experts must be an integer between 1 and 1024: num_experts got '2'"),
    ("moe-lora", "zero num_experts"): ({"num_experts": 0}, r"num_experts must be an integer"),
    ("moe-lora", "float top_k"): ({"top_k": 1.5}, r"top_k must be an integer"),
    ("moe-lora", "bool top_k"): ({"top_k": True}, r"top_k must be an integer"),
    ("moe-lora", "top_k above num_experts"): ({"top_k": 3}, r"top_k 3 must lie in 1..num_experts \(2\)"),
    ("moe-lora", "string r"): ({"r": "4"}, r"r must be an integer"),
    ("moe-lora", "missing r"): ({"r": None}, r"r must be an integer"),
    ("moe-lora", "string lora_alpha"): ({"lora_alpha": "4"}, r"lora_alpha must be a finite number"),
    ("moe-lora", "act_fn"): ({"act_fn": "gelu"}, r"act_fn must be 'silu'"),
    ("moe-lora", "routing"): ({"routing": ["top_k"]}, r"routing must be 'top_k' or 'sigmoid'"),
    ("reclora", "string num_meta_loras"): ({"num_meta_loras": "4"}, r"num_meta_loras must be an integer between 1 and 1024"),
    ("reclora", "huge num_meta_loras"): ({"num_meta_loras": 10**9}, r"num_meta_loras must be an integer"),
    ("reclora", "string gate_temperature"): ({"gate_temperature": "0.5"}, r"gate_temperature must be a finite number > 0"),
    ("reclora", "zero gate_temperature"): ({"gate_temperature": 0}, r"gate_temperature must be a finite number > 0"),
    ("reclora", "float r"): ({"r": 4.5}, r"r must be an integer"),
    ("reclora", "rank above max"): ({"r": 64}, r"exceeds --max-lora-rank 32"),
    ("reclora", "string target_modules"): ({"target_modules": "q_proj"}, r"target_modules must be a list of module names"),
    ("s2ft", "string target_modules"): ({"target_modules": "v_proj"}, r"target_modules must be a list of module names"),
    ("s2ft", "numeric target_modules entry"): ({"target_modules": ["v_proj", 1]}, r"target_modules\[1\] got 1"),
    ("s2ft", "string format_version"): ({"format_version": "1"}, r"format_version must be an integer"),
    ("s2ft", "bool format_version"): ({"format_version": True}, r"format_version must be an integer"),
    ("s2ft", "numeric base model"): ({"base_model_name_or_path": 7}, r"base_model_name_or_path must be a string"),
}


@pytest.mark.parametrize("family,case", sorted(BAD_FAMILY_CONFIG))
def test_bad_family_config_is_refused_naming_the_field(good, cfg, family, case):
    changes, match = BAD_FAMILY_CONFIG[(family, case)]
    refused(with_config(good[family], **changes), cfg, match)


# ---------- tensors: finite, floating point, the right shapes and indices ----------

A0, B0 = f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"
E0 = "mixlora.layers.0.mlp.up_proj.experts.1.lora_A.weight"
G0 = "mixlora.layers.0.mlp.moe_gate.weight"
R0 = "model.layers.0.self_attn.q_proj.reclora_A"
V0 = "model.layers.0.self_attn.v_proj.s2_row"

BAD_TENSORS = {
    ("lora", "NaN in lora_B"): (poke(B0, float("nan")), rf"tensor '{B0}' holds NaN or infinite values"),
    ("lora", "+inf in lora_A"): (poke(A0, float("inf")), rf"tensor '{A0}' holds NaN or infinite values"),
    ("lora", "-inf in bfloat16"): (lambda t: (t.__setitem__(A0, t[A0].bfloat16()), t[A0].__setitem__((1, 2), -float("inf"))), r"non-finite"),
    ("lora", "0-dim A"): (setitem(A0, torch.tensor(1.0)), r"layer 0 q_proj has A \(\), B"),
    ("lora", "1-D A"): (setitem(A0, torch.zeros(RANK)), r"layer 0 q_proj has A \(4,\)"),
    ("lora", "rank 0"): (lambda t: (t.__setitem__(A0, torch.zeros(0, 576)), t.__setitem__(B0, torch.zeros(576, 0))), r"with r >= 1"),
    ("lora", "int32 A"): (setitem(A0, torch.zeros(RANK, 576, dtype=torch.int32)), r"weights must be floating point, got torch.int32"),
    ("lora", "bool A"): (setitem(A0, torch.zeros(RANK, 576, dtype=torch.bool)), rf"tensor '{A0}' is torch.bool"),
    ("lora", "complex A"): (setitem(A0, torch.zeros(RANK, 576, dtype=torch.complex64)), r"is torch.complex64"),
    ("lora", "float8 A"): (setitem(A0, torch.zeros(RANK, 576).to(torch.float8_e4m3fn)), r"is torch.float8_e4m3fn"),
    ("lora", "float64 beyond float32"): (lambda t: t.__setitem__(A0, t[A0].double() * 1e300), r"lora_A: values up to .* overflow torch.float32"),
    ("lora", "one module spelled twice"): (lambda t: t.__setitem__(A0.replace("layers.0.", "layers.00."), t[A0].clone()), r"two tensors hold layer 0 q_proj lora_A"),
    ("lora", "5,000-digit layer"): (lambda t: t.__setitem__(A0.replace("layers.0.", "layers." + "1" * 5000 + "."), t[A0].clone()), r"unexpected tensor"),
    ("lora", "Unicode digit layer"): (lambda t: t.__setitem__(A0.replace("layers.0.", "layers.\u0661."), t[A0].clone()), r"unexpected tensor"),
    ("moe-lora", "NaN in a router"): (poke(G0, float("nan")), rf"tensor '{G0}' holds NaN"),
    ("moe-lora", "inf in an expert"): (poke(E0, float("inf")), rf"tensor '{E0}' holds NaN"),
    ("moe-lora", "integer router"): (lambda t: t.__setitem__(G0, t[G0].long()), r"moe_gate.weight must be floating point"),
    ("moe-lora", "router beyond the layers"): (lambda t: t.__setitem__(G0.replace(".0.", ".99."), t[G0].clone()), r"addresses layer 99"),
    ("moe-lora", "0-dim expert A"): (setitem(E0, torch.tensor(0.5)), r"has A torch.float32 \(\)"),
    ("moe-lora", "rank-0 attention LoRA"): (lambda t: (t.__setitem__("mixlora.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(0, 576)),
                                                       t.__setitem__("mixlora.layers.0.self_attn.q_proj.lora_B.weight", torch.zeros(576, 0))), r"1 <= r <= 32"),
    ("reclora", "NaN in a meta-LoRA"): (lambda t: t[R0].__setitem__((1, 0, 0), float("nan")), rf"tensor '{R0}' holds NaN"),
    ("reclora", "integer meta-LoRA"): (lambda t: t.__setitem__(R0, t[R0].int()), r"needs floating point reclora_A"),
    ("reclora", "inf in the gate"): (lambda t: _gate(t).__setitem__("reclora_gate.0.bias", torch.tensor([float("inf")] * 8)), r"reclora_gate.0.bias' holds NaN"),
    ("reclora", "integer gate"): (lambda t: _gate(t).__setitem__("reclora_gate.2.bias", torch.zeros(4, dtype=torch.int64)), r"gate's tensors must be floating point"),
    ("s2ft", "inf delta"): (poke(f"{V0}_delta", -float("inf")), r"s2_row_delta' holds NaN or infinite values"),
    ("s2ft", "bool indices"): (lambda t: t.__setitem__(f"{V0}_indices", t[f"{V0}_indices"].bool()), r"is torch.bool"),
    ("s2ft", "0-dim indices"): (setitem(f"{V0}_indices", torch.tensor(3, dtype=torch.int32)), r"non-empty 1-D tensor, got shape \(\)"),
    ("s2ft", "index out of range"): (lambda t: t[f"{V0}_indices"].__setitem__(-1, 10**6), r"out of range"),
    ("s2ft", "float64 delta beyond float32"): (lambda t: t.__setitem__(f"{V0}_delta", t[f"{V0}_delta"].double() * 1e300), r"s2_row_delta: values up to .* overflow"),
}


def _gate(t: dict) -> dict:
    """Add a valid gate (hidden 8, user dim 16) to a 4-meta-LoRA bank, for the test to spoil."""
    t.update({"reclora_gate.0.weight": torch.randn(8, 16), "reclora_gate.0.bias": torch.zeros(8),
              "reclora_gate.2.weight": torch.randn(4, 8), "reclora_gate.2.bias": torch.zeros(4)})
    return t


@pytest.mark.parametrize("family,case", sorted(BAD_TENSORS))
def test_bad_tensor_is_refused_naming_it(good, cfg, family, case):
    edit, match = BAD_TENSORS[(family, case)]
    refused(with_tensors(good[family], edit), cfg, match)


def test_float64_and_half_weights_are_served_in_the_engine_dtype(good, cfg):
    files = with_tensors(good["lora"], lambda t: (t.__setitem__(A0, t[A0].double()), t.__setitem__(B0, t[B0].half())))
    a, b, _ = parse(files, cfg).modules[(0, "q_proj")]
    assert a.dtype == b.dtype == torch.float32


# ---------- RecLoRA per-user state ----------

@pytest.fixture(scope="module")
def bank(good, cfg):
    # scale 1000 (alpha 4000, r 4): large enough that float32-finite weights can overflow a user's mixture
    return parse(with_config(with_tensors(good["reclora"], _gate), lora_alpha=4000), cfg)


BAD_USER_STATE = {
    "NaN weight": ({"weights": [0.5, float("nan"), 0.25, 0.25]}, r"finite"),
    "inf weight": ({"weights": [float("inf"), 0, 0, 0]}, r"finite"),
    "beyond float32": ({"weights": [1e39, 0, 0, 0]}, r"within float32's range"),
    "400-digit integer": ({"weights": [10**400, 0, 0, 0]}, r"finite"),
    "too few": ({"weights": [1, 0]}, r"user weights \(one per meta-LoRA\) must be a list of 4 numbers"),
    "strings": ({"weights": ["1", "0", "0", "0"]}, r"must be a list of 4 numbers"),
    "bools": ({"weights": [True, False, False, False]}, r"must be a list of 4 numbers"),
    "nested": ({"weights": [[1], [0], [0], [0]]}, r"must be a list of 4 numbers"),
    "not a list": ({"weights": {"a": 1}}, r"must be a list of 4 numbers"),
    "a mixture overflowing float32": ({"weights": [1e37] * 4}, r"overflow float32"),
    "short vector": ({"vector": [0.0] * 3}, r"the user vector must be a list of 16 numbers"),
    "NaN vector": ({"vector": [float("nan")] * 16}, r"the user vector must be finite"),
    "vector overflowing the gate": ({"vector": [3e38] * 16}, r"the gate overflows"),
    "neither": ({}, r"the user vector must be a list of 16 numbers, got None"),
}


@pytest.mark.parametrize("case", sorted(BAD_USER_STATE))
def test_bad_user_state_is_refused(bank, case):
    state, match = BAD_USER_STATE[case]
    with pytest.raises(AdapterError, match=match):
        bank.user_weights(state)


def test_good_user_state_materialises_finite(bank):
    for state in ({"weights": [1, 0, 0, 0]}, {"weights": [2**40, -(2**40), 0.5, 0]}, {"vector": [1.0] * 16}, None):
        w = bank.user_weights(state)
        lora = bank.materialize("u", w, torch.float32)
        assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b, _ in lora.modules.values())


# ---------- through HTTP: 400 invalid_adapter, quickly, while /health keeps answering ----------

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from server.adapters.service import build_adapter_service
    from server.api.app import build_app
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine
    from tests.conftest import LiveServer

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=2048, max_lora_rank=MAX_RANK))
    root = tmp_path_factory.mktemp("hostile-adapters")
    service = build_adapter_service(engine, str(root / "store"), None, root / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(engine, api_key=ADMIN, adapter_service=service)) as srv:
        srv.admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert srv.admin.post("/admin/v1/tenants", json={"name": "evil"}).status_code == 201
        yield srv


HTTP_CASES = {
    "catastrophic regex": lambda f: with_config(f, rank_pattern={f"{CATASTROPHIC[0]}|q_proj": 2}),
    "NaN weights": lambda f: with_tensors(f, poke(B0, float("nan"))),
    "string lora_alpha": lambda f: with_config(f, lora_alpha="16"),
    "invalid regex": lambda f: with_config(f, alpha_pattern={"(": 4}),
    "lookaround regex": lambda f: with_config(f, rank_pattern={"(?<!k)q_proj": 4}),
    "deeply nested config": lambda f: {**f, CONFIG: b'{"r": 4, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"},
}


def test_hostile_uploads_answer_400_while_health_keeps_answering(server, good):
    health: list[tuple[int, float]] = []
    stop = threading.Event()

    def watch():
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            while not stop.is_set():
                start = time.perf_counter()
                health.append((c.get("/health").status_code, time.perf_counter() - start))
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for case, make in HTTP_CASES.items():
            files = make(good["lora"])
            start = time.perf_counter()
            r = server.admin.post("/admin/v1/adapters", data={"tenant": "evil", "name": "x"}, files={k: (k, v) for k, v in files.items()})
            elapsed = time.perf_counter() - start
            assert r.status_code == 400, (case, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_adapter" and error["message"].startswith("evil/x: "), (case, error)
            assert not any(s in error["message"] for s in ("Traceback", "re.error", "RecursionError", "Exception")), (case, error)
            assert elapsed < 5, (case, elapsed)
        time.sleep(0.2)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert health and all(code == 200 for code, _ in health)
    assert max(t for _, t in health) < 2
    # and a good adapter still uploads
    r = server.admin.post("/admin/v1/adapters", data={"tenant": "evil", "name": "ok"}, files={k: (k, v) for k, v in good["lora"].items()})
    assert r.status_code == 201, r.text
