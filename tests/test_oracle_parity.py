"""hotswap's float32 outputs equal HF transformers + peft on the same weights (the independent oracle)."""
from __future__ import annotations

import pytest
import torch

from server.engine.sequence import SamplingParams, Sequence
from server.families.registry import SPACES
from server.models.modules import ADAPTER_MODULES

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
NEW_TOKENS = 32
# Same weights, same float32 math, different op order (fused q/k/v and gate/up GEMMs, paged attention).
LOGIT_ATOL = 2e-3


def _hf_model(model_dir, adapter_dir=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def _run_alone(engine, prompt_ids, adapter, max_tokens=NEW_TOKENS):
    seq = Sequence(list(prompt_ids), SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter)
    engine.add(seq)
    while engine.has_work():
        engine.step()
    return seq.output_token_ids


@pytest.mark.parametrize("adapter", [None, "r8-all", "r16-attn", "r8-rslora"])
def test_greedy_tokens_equal_transformers_peft(engine, model_dir, adapter_dirs, adapter):
    hf = _hf_model(model_dir, adapter_dirs[adapter] if adapter else None)
    for prompt in PROMPTS:
        ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
        assert _run_alone(engine, ids[0].tolist(), adapter) == ref, f"{adapter or 'base'}: {prompt!r}"


@pytest.mark.parametrize("adapter", [None, "r8-all"])
def test_prompt_logits_match_transformers_peft(engine, model_dir, adapter_dirs, adapter):
    """The logits of every prompt position, from our prefill, are within LOGIT_ATOL of the oracle's."""
    from server.layers.context import prefill_context
    from kernels import make_lora_plan

    hf = _hf_model(model_dir, adapter_dirs[adapter] if adapter else None)
    ids = engine.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
    # a one-sequence prefill written directly against the model, using blocks nobody else holds
    blocks = engine.block_manager.blocks_needed(n)
    table = torch.arange(engine.block_manager.num_blocks - blocks, engine.block_manager.num_blocks)
    slots = torch.cat([torch.arange(b * engine.block_manager.block_size, (b + 1) * engine.block_manager.block_size) for b in table])[:n]
    plan = None
    if adapter:
        entry = engine.adapters.get(adapter)
        plan = make_lora_plan([0, n], [entry.row_start], [entry.rank])
    ctx = prefill_context(slots, table.tolist(), {SPACES["lora"]: {m: plan for m in ADAPTER_MODULES}} if plan else {})
    with torch.inference_mode():
        ours = engine.model.compute_logits(engine.model(ids[0], torch.arange(n), ctx))
    err = (ours - ref).abs().max().item()
    assert err < LOGIT_ATOL, f"max |logit diff| = {err}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_bfloat16_engine_tracks_float32(model_dir, adapter_dirs, engine):
    """--dtype bfloat16: the chat answer survives and adapter deltas are applied (first-step logits close to float32)."""
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    bf16 = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, dtype="bfloat16", adapters={"r8-all": adapter_dirs["r8-all"]}, kv_cache_tokens=1024))
    chat = bf16.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False)
    ids = bf16.tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert "Paris" in bf16.tokenizer.decode(_run_alone(bf16, ids, None, max_tokens=10))

    from server.layers.context import prefill_context
    from kernels import make_lora_plan

    def prefill_logits(eng, adapter):
        n = len(ids)
        table = torch.arange(eng.block_manager.blocks_needed(n))
        entry = eng.adapters.get(adapter)
        plan = make_lora_plan([0, n], [entry.row_start], [entry.rank])
        ctx = prefill_context(torch.arange(n), table.tolist(), {SPACES["lora"]: {m: plan for m in ADAPTER_MODULES}})
        with torch.inference_mode():
            return eng.model.compute_logits(eng.model(torch.tensor(ids), torch.arange(n), ctx))[-1]

    ours, ref = prefill_logits(bf16, "r8-all"), prefill_logits(engine, "r8-all")
    assert torch.nn.functional.cosine_similarity(ours, ref, dim=0) > 0.99
    assert ours.argmax() == ref.argmax()
