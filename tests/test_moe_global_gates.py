"""Routed experts served through the step hook: the fast hook equals its readable reference on a real
layer, and MoLE's per-sample global gates (causal running mean of each layer's MLP input, see
server.families.moe) equal a dense reference — greedy tokens and logits, batched with other adapters,
chunked prefill, preemption — with malformed files refused."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save

from server.config import EngineConfig
from server.engine.sequence import SamplingParams, Sequence
from server.lora.peft import AdapterError
from tests.conftest import greedy_outputs
from tests.test_moe_lora import ALPHA, E, PROMPTS, R, R_ATTN, make_mixlora, write

NEW_TOKENS = 10
LOGIT_ATOL = 2e-3


def make_mole(cfg, seed: int = 0, bias: bool = True) -> tuple[dict[str, bytes], dict]:
    """A MixLoRA-format adapter with sigmoid routing and global gates in every layer."""
    files, t = make_mixlora(cfg, "sigmoid", E, seed)
    g = torch.Generator().manual_seed(seed + 100)
    for layer in range(cfg.num_layers):
        t[f"mixlora.layers.{layer}.mlp.moe_global_gate.weight"] = torch.randn(E, cfg.hidden_size, generator=g) * 0.5
        if bias:
            t[f"mixlora.layers.{layer}.mlp.moe_global_gate.bias"] = torch.randn(E, generator=g)
    config = json.loads(files["adapter_config.json"]) | {"global_gates": True}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": safetensors_save(t)}, t


def mole_reference(model_dir, t):
    """HF model, attention LoRAs merged, each MLP a loop over merged experts gated by
    σ(x W_rᵀ) · σ(x̄ W_gᵀ + b_g), x̄ the cumulative mean of the MLP input over the sequence (float64 sums).
    Run on whole sequences (no KV cache)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            for module in ("q_proj", "v_proj"):
                lin = getattr(layer.self_attn, module)
                lin.weight += (ALPHA / R_ATTN) * t[f"mixlora.layers.{i}.self_attn.{module}.lora_B.weight"] @ t[f"mixlora.layers.{i}.self_attn.{module}.lora_A.weight"]
            mlp = layer.mlp
            experts = []
            for e in range(E):
                experts.append({
                    m: getattr(mlp, m).weight + (ALPHA / R) * t[f"mixlora.layers.{i}.mlp.{m}.experts.{e}.lora_B.weight"] @ t[f"mixlora.layers.{i}.mlp.{m}.experts.{e}.lora_A.weight"]
                    for m in ("gate_proj", "up_proj", "down_proj")
                })
            router = t[f"mixlora.layers.{i}.mlp.moe_gate.weight"]
            w_g = t[f"mixlora.layers.{i}.mlp.moe_global_gate.weight"]
            b_g = t.get(f"mixlora.layers.{i}.mlp.moe_global_gate.bias", torch.zeros(E))

            def forward(x, experts=experts, router=router, w_g=w_g, b_g=b_g):
                counts = torch.arange(1, x.shape[1] + 1, dtype=torch.float64).view(1, -1, 1)
                mean = (x.double().cumsum(1) / counts).float()  # the causal per-sample input
                gates = torch.sigmoid(x @ router.T) * torch.sigmoid(mean @ w_g.T + b_g)
                out = torch.zeros_like(x)
                for e, w in enumerate(experts):
                    out += gates[..., e : e + 1] * ((F.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)) @ w["down_proj"].T)
                return out

            mlp.forward = forward
    return hf


def reference_greedy(hf, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of the reference, and its logits at every position of prompt + tokens[:-1]."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
        logits = hf(torch.tensor([seq[:-1]]), use_cache=False).logits[0].float()
    return seq[len(ids):], logits


def engine_greedy(engine, ids: list[int], adapter: str, n: int) -> tuple[list[int], torch.Tensor]:
    """One sequence alone through the engine: its tokens and the logits of every row it computed."""
    rows: list[torch.Tensor] = []
    forward = engine.runner.forward

    def recording(layout, ctx):
        hidden = forward(layout, ctx)
        rows.append(hidden.clone())
        return hidden

    engine.runner.forward = recording
    try:
        seq = Sequence(list(ids), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), adapter)
        engine.add(seq)
        while engine.has_work():
            engine.step()
    finally:
        engine.runner.forward = forward
    with torch.inference_mode():
        logits = engine.model.compute_logits(torch.cat(rows))
    return seq.output_token_ids, logits


@pytest.fixture(scope="module")
def mole_files(model_dir):
    from server.models.config import ModelConfig

    return make_mole(ModelConfig.from_dir(model_dir), seed=3)


@pytest.fixture(scope="module")
def mole_engine(model_dir, adapter_dirs, mole_files, tmp_path_factory):
    from server.engine.llm_engine import LLMEngine
    from server.models.config import ModelConfig

    tmp = tmp_path_factory.mktemp("mole")
    cfg = ModelConfig.from_dir(model_dir)
    adapters = {
        "mole": write(mole_files[0], tmp / "mole"),
        "mole-nobias": write(make_mole(cfg, seed=4, bias=False)[0], tmp / "mole-nobias"),
        "moe": write(make_mixlora(cfg, "top_k", 2, seed=5)[0], tmp / "moe"),
        "sig": write(make_mixlora(cfg, "sigmoid", E, seed=6)[0], tmp / "sig"),
        "lora": adapter_dirs["r8-all"],
    }
    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters=adapters, kv_cache_tokens=4096))


# -- the fast hook against its readable reference, on one real layer ------------------------------

def _carried(pos: int, layers: int, d: int) -> dict:
    """The state a sequence at `pos` carries into a step: running sums of positions < pos (random here)."""
    if pos == 0:
        return {}
    return {"moe_pos": pos, "moe_sums": torch.randn(layers, d, generator=torch.Generator().manual_seed(pos), dtype=torch.float64) * pos}


@pytest.mark.parametrize("adapter", ["moe", "sig", "mole"])
@pytest.mark.parametrize("layout", ["contiguous", "split"])
@pytest.mark.parametrize("bias", [False, True])
def test_experts_hook_equals_its_reference_on_a_layer(mole_engine, adapter, layout, bias):
    from server.families.base import SeqRows
    from server.families.moe import ExpertsStep, ExpertsStepReference, _Member

    engine = mole_engine
    entry = engine.adapters.get(adapter)
    layer = engine.model.layers[2]
    g = torch.Generator().manual_seed(0)
    T, d, i = 40, layer.gate_up_proj.in_features, layer.intermediate_size
    # the adapter's sequences: a decode token and a 9-token chunk in one slice, or apart (other rows between)
    spans = [(3, 4, 17), (4, 13, 0)] if layout == "contiguous" else [(3, 4, 17), (20, 29, 0), (35, 38, 6)]
    tokens = torch.tensor([t for s, e, _ in spans for t in range(s, e)])
    h = torch.randn(T, d, generator=g)
    saved = layer.down_proj.bias
    if bias:
        layer.down_proj.bias = torch.nn.Parameter(torch.randn(d, generator=g), requires_grad=False)
    try:
        with torch.inference_mode():
            gate_up = layer.gate_up_proj.base(h)
            act = F.silu(gate_up[:, :i]) * gate_up[:, i:]
            outs = []
            for hook_cls in (ExpertsStep, ExpertsStepReference):
                seqs = [SeqRows(s, e, pos, _carried(pos, engine.model.config.num_layers, d)) for s, e, pos in spans]
                start = entry.row_start + entry.weights.attn_rank
                if hook_cls is ExpertsStep:
                    hook = ExpertsStep([_Member(entry.weights, tokens, start, seqs)])
                else:
                    hook = ExpertsStepReference(entry.weights, tokens, start, seqs)
                a = act.clone()
                hook.before_down(layer, h, gate_up, a)
                out = layer.down_proj.base(a)
                hook.after_mlp(layer, h, gate_up, out)
                hook.end_step()
                outs.append((out, [dict(s.state) for s in seqs]))
            (fast, fast_state), (ref, ref_state) = outs
            others = torch.ones(T, dtype=torch.bool)
            others[tokens] = False
            scale = ref[tokens].abs().max().item()
            torch.testing.assert_close(fast[tokens], ref[tokens], atol=2e-5 * scale, rtol=1e-4)
            assert torch.equal(fast[others], layer.down_proj.base(act)[others])  # rows of other adapters untouched
            if adapter == "mole":  # the running sums the step commits: equal, and continued from the carried state
                for a_state, b_state, (s, e, pos) in zip(fast_state, ref_state, spans):
                    assert a_state["moe_pos"] == b_state["moe_pos"] == pos + e - s
                    torch.testing.assert_close(a_state["moe_sums"], b_state["moe_sums"], atol=1e-9, rtol=0)
    finally:
        layer.down_proj.bias = saved


@pytest.mark.parametrize("layout", ["one slice", "gathered"])
def test_a_group_of_adapters_in_one_hook_equals_each_through_its_reference(mole_engine, layout):
    """Adapters with experts of the same shape share one hook (one set of ops per layer): MoLE with and
    without a global-gate bias, as a decode step lays them out (n rows each, adjacent) or with unequal
    counts and other rows between (gathered and padded)."""
    from server.families.base import SeqRows
    from server.families.moe import ExpertsStep, ExpertsStepReference, _Member

    engine = mole_engine
    layer = engine.model.layers[5]
    entries = [engine.adapters.get(name) for name in ("mole", "mole-nobias")]
    g = torch.Generator().manual_seed(1)
    T, d, i = 30, layer.gate_up_proj.in_features, layer.intermediate_size
    if layout == "one slice":  # each adapter: three decode tokens
        spans = [[(4, 5, 9), (5, 6, 3), (6, 7, 12)], [(7, 8, 5), (8, 9, 2), (9, 10, 30)]]
    else:  # one adapter: a decode token and a 6-token chunk; the other: two decode tokens, apart
        spans = [[(2, 3, 11), (20, 26, 0)], [(5, 6, 4), (12, 13, 7)]]
    h = torch.randn(T, d, generator=g)
    with torch.inference_mode():
        gate_up = layer.gate_up_proj.base(h)
        act = F.silu(gate_up[:, :i]) * gate_up[:, i:]
        results = []
        for grouped in (True, False):
            members = []
            for entry, adapter_spans in zip(entries, spans):
                tokens = torch.tensor([t for s, e, _ in adapter_spans for t in range(s, e)])
                seqs = [SeqRows(s, e, pos, _carried(pos, engine.model.config.num_layers, d)) for s, e, pos in adapter_spans]
                members.append(_Member(entry.weights, tokens, entry.row_start + entry.weights.attn_rank, seqs))
            hooks = [ExpertsStep(members)] if grouped else [ExpertsStepReference(m.weights, m.tokens, m.expert_row_start, m.seqs) for m in members]
            a = act.clone()
            for hook in hooks:
                hook.before_down(layer, h, gate_up, a)
            out = layer.down_proj.base(a)
            for hook in hooks:
                hook.after_mlp(layer, h, gate_up, out)
                hook.end_step()
            results.append((out, [dict(s.state) for m in members for s in m.seqs]))
        (fast, fast_state), (ref, ref_state) = results
        rows = torch.tensor([t for adapter_spans in spans for s, e, _ in adapter_spans for t in range(s, e)])
        others = torch.ones(T, dtype=torch.bool)
        others[rows] = False
        torch.testing.assert_close(fast[rows], ref[rows], atol=2e-5 * ref[rows].abs().max().item(), rtol=1e-4)
        assert torch.equal(fast[others], layer.down_proj.base(act)[others])
        for a_state, b_state in zip(fast_state, ref_state):
            assert a_state["moe_pos"] == b_state["moe_pos"]
            torch.testing.assert_close(a_state["moe_sums"], b_state["moe_sums"], atol=1e-9, rtol=0)


@pytest.mark.parametrize("layout", ["one slice", "gathered"])
def test_non_finite_inputs_of_one_adapter_in_a_group_leave_the_others_alone(mole_engine, layout):
    """One adapter's tokens blew up (NaN hidden states: that request fails alone) while sharing a hook
    with another tenant's adapter: the other's outputs and committed running sums are what they are
    through its own reference, with nothing non-finite."""
    from server.families.base import SeqRows
    from server.families.moe import ExpertsStep, ExpertsStepReference, _Member

    engine = mole_engine
    layer = engine.model.layers[3]
    cfg = engine.model.config
    bad_entry, good_entry = engine.adapters.get("mole"), engine.adapters.get("mole-nobias")
    T, d, i = 24, layer.gate_up_proj.in_features, layer.intermediate_size
    if layout == "one slice":  # the bad adapter's rows come first, so a carry across rows would reach the good ones
        spans = [[(2, 3, 7), (3, 4, 2)], [(4, 5, 9), (5, 6, 4)]]
    else:
        spans = [[(1, 2, 7), (8, 14, 0)], [(15, 16, 9), (20, 21, 4)]]
    bad_rows = [t for s, e, _ in spans[0] for t in range(s, e)]
    good_rows = torch.tensor([t for s, e, _ in spans[1] for t in range(s, e)])
    h = torch.randn(T, d, generator=torch.Generator().manual_seed(3))
    h[bad_rows] = float("nan")

    def member(entry, adapter_spans):
        tokens = torch.tensor([t for s, e, _ in adapter_spans for t in range(s, e)])
        seqs = [SeqRows(s, e, pos, _carried(pos, cfg.num_layers, cfg.hidden_size)) for s, e, pos in adapter_spans]
        return _Member(entry.weights, tokens, entry.row_start + entry.weights.attn_rank, seqs)

    with torch.inference_mode():
        gate_up = layer.gate_up_proj.base(h)
        act = F.silu(gate_up[:, :i]) * gate_up[:, i:]
        group, good = [member(bad_entry, spans[0]), member(good_entry, spans[1])], member(good_entry, spans[1])
        results = []
        for hook in (ExpertsStep(group), ExpertsStepReference(good.weights, good.tokens, good.expert_row_start, good.seqs)):
            a = act.clone()
            hook.before_down(layer, h, gate_up, a)
            out = layer.down_proj.base(a)
            hook.after_mlp(layer, h, gate_up, out)
            hook.end_step()
            results.append(out[good_rows])
        fast, ref = results
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, ref, atol=2e-5 * ref.abs().max().item(), rtol=1e-4)
        for grouped, alone in zip(group[1].seqs, good.seqs):
            assert torch.isfinite(grouped.state["moe_sums"]).all()
            torch.testing.assert_close(grouped.state["moe_sums"], alone.state["moe_sums"], atol=1e-9, rtol=0)


def test_decode_steps_group_adapters_of_one_shape(mole_engine):
    """The family's step hooks: decode-sized adapters with experts of the same shape share a hook; other
    shapes and prefill-sized adapters get their own."""
    from server.families.base import HookedAdapter, SeqRows
    from server.families.moe import FAMILY

    cfg = mole_engine.model.config

    def hooked(name, rows):
        return HookedAdapter(mole_engine.adapters.get(name), torch.tensor(rows), [SeqRows(r, r + 1, 5, _carried(5, cfg.num_layers, cfg.hidden_size)) for r in rows])

    hooks = FAMILY.step_hooks([hooked("mole", [0, 1]), hooked("moe", [2]), hooked("mole-nobias", [3]), hooked("sig", [4])])
    assert sorted(len(h.members) for h in hooks) == [1, 1, 2]
    long = HookedAdapter(mole_engine.adapters.get("mole-nobias"), torch.arange(10, 50), [SeqRows(10, 50, 0, {})])
    hooks = FAMILY.step_hooks([hooked("mole", [0, 1]), long])
    assert sorted(len(h.members) for h in hooks) == [1, 1]


# -- MoLE global gates end to end -----------------------------------------------------------------

def test_global_gates_equal_the_dense_reference(mole_engine, model_dir, mole_files):
    hf = mole_reference(model_dir, mole_files[1])
    for prompt in PROMPTS:
        ids = mole_engine.tokenizer(prompt)["input_ids"]
        ref_tokens, ref_logits = reference_greedy(hf, ids, NEW_TOKENS)
        tokens, logits = engine_greedy(mole_engine, ids, "mole", NEW_TOKENS)
        assert tokens == ref_tokens, prompt
        err = (logits - ref_logits).abs().max().item()
        assert err < LOGIT_ATOL, f"{prompt!r}: max |logit diff| {err}"
    assert mole_engine.runner._seq_state == {}  # finished sequences leave no state behind


def test_global_gates_matter(mole_engine, model_dir, mole_files):
    """The same experts without the global gates (plain sigmoid routing) answer differently: the gates are applied."""
    ids = mole_engine.tokenizer(PROMPTS[0])["input_ids"]
    _, with_gates = engine_greedy(mole_engine, ids, "mole", 1)
    weights = mole_engine.adapters.get("mole").weights
    saved = dict(weights.global_gates)
    weights.global_gates.clear()
    try:
        _, without = engine_greedy(mole_engine, ids, "mole", 1)
    finally:
        weights.global_gates.update(saved)
    assert (with_gates - without).abs().max() > 0.1


def test_global_gates_in_a_batch_with_other_adapters_equal_each_alone(mole_engine):
    jobs = [(p, a) for p in PROMPTS for a in ("mole", "moe", None, "mole-nobias", "lora", "sig")] + [("Another mole prompt", "mole")]
    together = greedy_outputs(mole_engine, jobs, 8)
    assert together == [greedy_outputs(mole_engine, [j], 8)[0] for j in jobs]
    assert mole_engine.runner._seq_state == {}


def test_aborted_sequences_leave_no_running_sums(mole_engine):
    seqs = [Sequence(mole_engine.tokenizer(p)["input_ids"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), "mole") for p in PROMPTS[:2]]
    for seq in seqs:
        mole_engine.add(seq)
    for _ in range(3):
        mole_engine.step()
    assert len(mole_engine.runner._seq_state) == 2
    mole_engine.abort(seqs[0])
    assert set(mole_engine.runner._seq_state) == {seqs[1].seq_id}
    while mole_engine.has_work():
        mole_engine.step()
    assert mole_engine.runner._seq_state == {}


def test_chunked_prefill_equals_unchunked(mole_engine, model_dir, mole_files, tmp_path):
    from server.engine.llm_engine import LLMEngine

    chunked = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"mole": write(mole_files[0], tmp_path / "mole")}, kv_cache_tokens=1024,
                                     max_num_batched_tokens=3))  # fmt: skip
    ids = chunked.tokenizer(PROMPTS[1])["input_ids"]
    assert len(ids) > 3
    tokens, logits = engine_greedy(chunked, ids, "mole", NEW_TOKENS)
    ref_tokens, ref_logits = engine_greedy(mole_engine, ids, "mole", NEW_TOKENS)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < 1e-3
    # chunks of several sequences interleave with decode steps: still each alone
    jobs = [(p, "mole") for p in PROMPTS] + [("A somewhat longer prompt for the mole adapter to chew on", "mole")]
    assert greedy_outputs(chunked, jobs, 6) == [greedy_outputs(mole_engine, [j], 6)[0] for j in jobs]
    assert chunked.runner._seq_state == {}


def test_preempted_sequences_recompute_their_running_sums(mole_engine, model_dir, mole_files, tmp_path):
    from server.engine.llm_engine import LLMEngine

    small = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"mole": write(mole_files[0], tmp_path / "mole")}, kv_cache_tokens=96,
                                   max_num_batched_tokens=32))  # fmt: skip
    prompts = ["Once upon a time", "The capital of France is", "def add(a, b):", "Hello there, how are", "One two three four"]
    # 6 blocks of 16 tokens; each sequence grows to 3 blocks: running ones get preempted as they grow
    seqs = [Sequence(small.tokenizer(p)["input_ids"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), "mole") for p in prompts]
    for s in seqs:
        small.add(s)
    while small.has_work():
        small.step()
        assert set(small.runner._seq_state) <= {s.seq_id for s in small.scheduler.running}  # state only while running
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [s.output_token_ids for s in seqs] == [greedy_outputs(mole_engine, [(p, "mole")], 40)[0] for p in prompts]
    assert small.runner._seq_state == {}


def test_malformed_global_gates_are_refused(model_dir):
    from server.families.moe import parse_mixlora
    from server.models.config import ModelConfig

    cfg = ModelConfig.from_dir(model_dir)

    def parse(files):
        return parse_mixlora(files, "m", cfg, torch.float32, 64)

    def with_tensors(files, t):
        return {**files, "adapter_model.safetensors": safetensors_save(t)}

    def with_config(files, **changes):
        return {**files, "adapter_config.json": json.dumps(json.loads(files["adapter_config.json"]) | changes).encode()}

    files, t = make_mole(cfg)
    assert set(parse(files).global_gates) == set(range(cfg.num_layers))
    with pytest.raises(AdapterError, match="sigmoid"):
        parse(with_config(files, routing="top_k", top_k=2))
    with pytest.raises(AdapterError, match="global_gates"):
        parse(with_config(files, global_gates="yes"))
    with pytest.raises(AdapterError, match="global_gates"):  # global gate tensors, but the config does not ask for them
        parse(with_config(files, global_gates=False))
    bad = dict(t)
    del bad["mixlora.layers.2.mlp.moe_global_gate.weight"]
    with pytest.raises(AdapterError, match="moe_global_gate"):
        parse(with_tensors(files, bad))
    for key, value in (("mixlora.layers.1.mlp.moe_global_gate.weight", torch.zeros(E + 1, cfg.hidden_size)),
                       ("mixlora.layers.1.mlp.moe_global_gate.bias", torch.zeros(E, 1)),
                       ("mixlora.layers.1.mlp.moe_global_gate.weight", torch.zeros(E, cfg.hidden_size, dtype=torch.int32))):  # fmt: skip
        with pytest.raises(AdapterError, match="moe_global_gate"):
            parse(with_tensors(files, {**t, key: value}))
    with pytest.raises(AdapterError, match="moe_global_gate"):  # the same layer named twice
        parse(with_tensors(files, {**t, "mixlora.layers.01.mlp.moe_global_gate.weight": torch.zeros(E, cfg.hidden_size)}))
    with pytest.raises(AdapterError, match="layer"):  # beyond the model
        parse(with_tensors(files, {**t, f"mixlora.layers.{cfg.num_layers}.mlp.moe_global_gate.weight": torch.zeros(E, cfg.hidden_size)}))
    no_router = {k: v for k, v in t.items() if not k.startswith("mixlora.layers.4.mlp.") or "global" in k}
    with pytest.raises(AdapterError, match="router"):  # a global gate where the layer has no experts
        parse(with_tensors(files, no_router))
    nan = dict(t)
    nan["mixlora.layers.0.mlp.moe_global_gate.bias"] = torch.full((E,), float("nan"))
    with pytest.raises(AdapterError, match="finite|NaN"):
        parse(with_tensors(files, nan))
