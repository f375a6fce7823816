"""hotswap's float32 outputs equal HF transformers + peft on the same weights (the independent oracle)."""
from __future__ import annotations

import pytest
import torch

from server.engine.sequence import SamplingParams, Sequence

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
    from server.layers.context import ForwardContext, PrefillChunk
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
    ctx = ForwardContext(slots, 0, None, None, [PrefillChunk(0, n, 0, table)], plan)
    with torch.inference_mode():
        ours = engine.model.compute_logits(engine.model(ids[0], torch.arange(n), ctx))
    err = (ours - ref).abs().max().item()
    assert err < LOGIT_ATOL, f"max |logit diff| = {err}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
