"""`--model PATH` serves Llama-family checkpoints: tiny random Llama (llama3 RoPE), Mistral and Qwen2 (q/k/v bias)
give the same greedy tokens and logits as HF transformers on the same weights."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.config import EngineConfig
from server.engine.sequence import SamplingParams, Sequence

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _config(family: str, vocab: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family == "llama3-rope":
        return LlamaConfig(vocab_size=vocab, **TINY, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, tie_word_embeddings=False)
    if family == "mistral":
        return MistralConfig(vocab_size=vocab, **TINY, sliding_window=None)
    return Qwen2Config(vocab_size=vocab, **TINY, tie_word_embeddings=True)


@pytest.mark.parametrize("family", ["llama3-rope", "mistral", "qwen2"])
def test_tiny_checkpoint_matches_transformers(family, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from server.engine.llm_engine import LLMEngine

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(family, 49152), dtype=torch.float32).eval()
    if family == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in hf.model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)

    engine = LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=tmp_path, kv_cache_tokens=512))
    ids = [1, 520, 9531, 198, 4093, 314, 260, 3575, 282]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    seq = Sequence(ids, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert seq.output_token_ids == ref
