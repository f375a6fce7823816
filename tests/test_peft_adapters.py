"""PEFT adapter files: every PEFT LoRA feature we claim loads unchanged; every malformed file is refused clearly."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.sequence import SamplingParams, Sequence
from server.lora.peft import AdapterError, load_peft_lora
from server.models.config import ModelConfig


@pytest.fixture(scope="module")
def cfg(model_dir):
    return ModelConfig.from_dir(model_dir)


@pytest.fixture
def broken(adapter_dirs, tmp_path):
    """A writable copy of a good adapter to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(adapter_dirs["r8-all"], dst)
    return dst


def _load(path, cfg, max_rank=64):
    return load_peft_lora(path, "t", cfg, torch.float32, max_rank)


def test_rank_and_alpha_patterns_match_peft(model_dir, engine, tmp_path):
    """rank_pattern / alpha_pattern / regex target_modules, made by peft, give HF+peft's greedy tokens."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lcfg = LoraConfig(
        r=8, lora_alpha=16, target_modules=r".*\.(q_proj|v_proj|down_proj)", init_lora_weights=False,
        rank_pattern={"v_proj": 4, "layers.3.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3},
    )
    model = get_peft_model(base, lcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.5)
    model.save_pretrained(tmp_path / "patterned")
    engine.load_adapter("patterned", tmp_path / "patterned")
    weights = _load(tmp_path / "patterned", engine.model.config)
    assert weights.modules[(3, "q_proj")][0].shape[0] == 2 and weights.modules[(0, "v_proj")][0].shape[0] == 4
    assert weights.modules[(0, "down_proj")][2] == pytest.approx(3 / 8)

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tmp_path / "patterned").eval()
    ids = engine.tokenizer("The weather today is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    seq = Sequence(ids[0].tolist(), SamplingParams(max_tokens=24, temperature=0.0), "patterned")
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert seq.output_token_ids == ref


def test_bad_json_config_is_refused(broken, cfg):
    (broken / "adapter_config.json").write_text("{r: 8,")
    with pytest.raises(AdapterError, match="not valid JSON"):
        _load(broken, cfg)


def test_pickle_weights_are_never_loaded(broken, cfg):
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(AdapterError, match="never loaded"):
        _load(broken, cfg)


def test_truncated_safetensors_is_refused(broken, cfg):
    f = broken / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        _load(broken, cfg)


def test_shapes_that_do_not_fit_the_base_are_refused(broken, cfg):
    f = broken / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(8, 100)
    save_file(tensors, str(f))
    with pytest.raises(AdapterError, match="base model needs"):
        _load(broken, cfg)


def test_rank_above_the_limit_is_refused(adapter_dirs, cfg):
    with pytest.raises(AdapterError, match="max-lora-rank"):
        _load(adapter_dirs["r32-q"], cfg, max_rank=16)


def test_unknown_target_module_is_refused(broken, cfg):
    f = broken / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"] = torch.zeros(8, 576)
    tensors["base_model.model.model.layers.0.self_attn.rotary.lora_B.weight"] = torch.zeros(576, 8)
    save_file(tensors, str(f))
    with pytest.raises(AdapterError, match="not supported"):
        _load(broken, cfg)


def test_dora_and_modules_to_save_are_refused(broken, cfg):
    raw = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        _load(broken, cfg)
    (broken / "adapter_config.json").write_text(json.dumps({**raw, "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterError, match="modules_to_save"):
        _load(broken, cfg)


def test_unpaired_lora_weight_is_refused(broken, cfg):
    f = broken / "adapter_model.safetensors"
    tensors = load_file(str(f))
    del tensors[next(k for k in tensors if "lora_B" in k)]
    save_file(tensors, str(f))
    with pytest.raises(AdapterError, match="not its pair"):
        _load(broken, cfg)


def test_server_refuses_to_start_with_a_malformed_adapter(model_dir, broken):
    from server.config import EngineConfig
    from server.engine.llm_engine import LLMEngine

    (broken / "adapter_config.json").write_text("[]")
    with pytest.raises(AdapterError, match="JSON object"):
        LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, adapters={"bad": broken}, kv_cache_tokens=256))
