"""The llama.cpp peer's pure helpers (loadtests/llama_cpp.py): no build, no server."""
from pathlib import Path

import pytest

from loadtests import llama_cpp
from loadtests.compare import build_parser, spec_for


def test_command_has_the_issue_settings_and_adapters_off_by_default():
    cmd = llama_cpp.llama_server_command(Path("/x/llama-server"), Path("/m.gguf"), 8123, [Path("/a0.gguf"), Path("/a1.gguf")],
                                         ctx=8192, alias="SmolLM2-135M-Instruct")
    s = " ".join(cmd)
    assert cmd[0] == "/x/llama-server"
    for frag in ("-m /m.gguf", "--host 127.0.0.1", "--port 8123", "-t 2", "-tb 2", "-np 16", "-cb", "-c 8192", "--cache-ram 0",
                 "--no-repack", "--alias SmolLM2-135M-Instruct"):
        assert frag in s, frag
    # adapters in order, in one comma-separated --lora (repeating --lora is deprecated in this llama.cpp):
    # the request's lora ids are these indices; loaded but not applied
    assert [cmd[i + 1] for i, a in enumerate(cmd) if a == "--lora"] == ["/a0.gguf,/a1.gguf"]
    assert "--lora-init-without-apply" in cmd
    with pytest.raises(ValueError):
        llama_cpp.llama_server_command(Path("srv"), Path("m.gguf"), 1, [Path("/a,b.gguf")])


def test_command_without_adapters_has_no_lora_flags():
    cmd = llama_cpp.llama_server_command(Path("srv"), Path("m.gguf"), 1, extra=["--metrics"])
    assert "--lora" not in cmd and "--lora-init-without-apply" not in cmd
    assert cmd[-1] == "--metrics"
    assert cmd[cmd.index("-c") + 1] == str(16 * 512)


def test_context_size_is_per_slot_rounded_up():
    assert llama_cpp.context_size(16, 192, 128) == 16 * 512
    assert llama_cpp.context_size(16, 600, 128) == 16 * 768
    assert llama_cpp.context_size(1, 10, 10) == 512


def test_request_fields_select_one_adapter_and_never_reuse_the_prompt_cache():
    # the base model: an explicit list with every scale 0 (without `lora` llama-server applies all adapters)
    assert llama_cpp.lora_request_fields(None) == {"cache_prompt": False, "lora": [{"id": 0, "scale": 0.0}]}
    assert llama_cpp.lora_request_fields(3) == {"cache_prompt": False, "lora": [{"id": 3, "scale": 1.0}]}
    hook = llama_cpp.body_hook(["lora-0000", "lora-0001", "lora-0002"])
    assert hook("lora-0002")["lora"] == [{"id": 2, "scale": 1.0}]
    assert hook("SmolLM2-135M-Instruct")["lora"] == [{"id": 0, "scale": 0.0}]


def test_compare_specs_for_llamacpp_and_single_stream():
    args = build_parser().parse_args(["--systems", "llamacpp", "--loads", "single,base,lora"])
    names = ["lora-0000", "lora-0001"]
    spec = spec_for(args, "http://127.0.0.1:1", names, "lora", "x", 1.0, None, 0, system="llamacpp")
    assert spec.body_for_model("lora-0001")["lora"] == [{"id": 1, "scale": 1.0}]
    single = spec_for(args, "http://127.0.0.1:1", names, "single", "x", 1.0, None, 0, system="hotswap")
    assert single.concurrency == 1 and single.output_len == "fixed:128" and single.popularity == "base"
    assert single.body_for_model is None
    # the defaults of the existing loads are unchanged
    base = spec_for(build_parser().parse_args([]), "http://127.0.0.1:1", names, "base", "x", 1.0, None, 0, system="hotswap")
    assert base.concurrency == 16 and base.output_len == "uniform:16-48" and base.body_for_model is None
