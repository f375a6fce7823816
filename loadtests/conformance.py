"""API conformance against vLLM: the same requests to hotswap and to vLLM's OpenAI server, responses
compared field by field for their structure — not for what the model wrote.

    python -m loadtests.conformance [--out var/conformance] [--only NAME ...] [--hotswap-url URL --vllm-url URL]

Both servers serve the embedded model (float32, greedy requests) and one LoRA under the same name, from
one model directory whose chat template can render tools (Hermes style, as vLLM's `hermes` tool parser
reads). vLLM comes from `make bench`'s environment (`.venv-vllm`, loadtests/setup_vllm.sh), started at
its best CPU setting as loadtests/compare.py does, with runtime LoRA updating, auto tool choice and the
hermes parser on. Every case goes non-streamed and, where it can, streamed.

What is compared, recursively:
- the keys of every object (a key one side has and the other lacks is a difference; a key whose value
  is null on one side and absent on the other is reported as such);
- the JSON type of every value (string, number, object, list, bool, null);
- the values of protocol fields (`object`, `finish_reason`, `role`, `type`, the `id` prefix, `model`),
  the lengths of lists whose length the request fixes (choices, logprobs per token, top_logprobs);
- for streams: the fields of the first, middle and last chunks, the final usage chunk and `[DONE]`.
Text, token strings, logprob values, ids and timestamps are model output or per-call: not compared.

Prints a markdown report (and writes it with the raw responses to --out); exits 1 if any case differs.
The differences that are intentional are listed in docs/api.md ("Differences from vLLM").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.servers import ServerProcess, ensure_lora_adapters, free_port, hotswap_cmd, repo_root

MODEL = "SmolLM2-135M-Instruct"
ADAPTER = "conformance-lora"
VALUE_KEYS = {"object", "finish_reason", "role", "type", "model"}
PREFIX_KEYS = {"id"}  # compared up to the first '-': cmpl-..., chatcmpl-...
# The free-text or per-call values: never compared, only their types
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
You can call functions. Available tools:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, answer <tool_call>{"name": <name>, "arguments": <arguments object>}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' and not tools %}<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
{% endif %}<|im_start|>{{ message['role'] }}
{%- if message.get('tool_calls') %}{% for call in message['tool_calls'] %}
<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>{% endfor %}
{%- else %}
{{ message['content'] }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                 "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
HELLO = [{"role": "user", "content": "Say hello."}]


# Differences kept on purpose (docs/api.md, "Differences from vLLM"): (pattern of the difference line, why).
INTENTIONAL = [
    (r"\$(\.choices\[\d+\])?\.(prompt_text|prompt_token_ids|token_ids|routed_experts|kv_transfer_params|ec_transfer_params|metrics|"
     r"prompt_logprobs|stop_reason)(\.|:).*only vLLM", "vLLM's own response fields (debugging, disaggregation, its stop_reason): not OpenAI's"),
    (r"\.message\.reasoning: only vLLM", "vLLM's reasoning-parser field: hotswap has no reasoning parser"),
    (r"\.data\[\d+\]\.permission: only vLLM", "OpenAI dropped `permission` from model cards; vLLM still lists one"),
    (r"\.error\.(type|code): hotswap", "errors follow OpenAI (type invalid_request_error / not_found_error, code a string or null); vLLM puts "
     "the exception class in `type` and the status in `code`"),
    (r"first chunk \$\.system_fingerprint: only hotswap|second chunk \$\.system_fingerprint: only hotswap|"
     r"last chunk with choices \$\.system_fingerprint: only hotswap", "OpenAI sends system_fingerprint in every chunk; vLLM in the last"),
    (r"tool_calls\[\d+\]\.id: id prefix hotswap 'call_", "tool call ids are OpenAI's call_...; vLLM's chatcmpl-tool-..."),
    (r"\.usage\.prompt_tokens_details: (only hotswap|hotswap object)", "usage.prompt_tokens_details.cached_tokens (OpenAI's) counts the "
     "prefix cache's tokens; vLLM fills it only with --enable-prompt-tokens-details"),
    (r"\.message\.content: hotswap null null \| vLLM string \"\"", "a message with tool_calls has content null (OpenAI); vLLM sends \"\""),
    (r"(second chunk|last chunk with choices) \$\.choices\[0\]\.delta\.(tool_calls|content)", "tool-call streaming: a named call "
     "streams its arguments from the first chunk, `required` and `auto` send whole calls at the end (vLLM streams every call piece by piece)"),
]
IGNORED_CASES = {  # cases where vLLM 0.32 does not do what was asked, so the structures cannot be compared
    "chat-guided-choice": "vLLM 0.32 ignores guided_choice (use structured_outputs); hotswap honours it",
    "chat-guided-regex": "vLLM 0.32 ignores guided_regex (use structured_outputs); hotswap honours it",
}


def intentional(line: str) -> str | None:
    return next((why for pattern, why in INTENTIONAL if re.search(pattern, line)), None)


@dataclass
class Case:
    name: str
    path: str
    body: dict
    stream: bool = True  # also sent with stream: true (and include_usage)
    method: str = "POST"
    admin: bool = False
    notes: list[str] = field(default_factory=list)


def cases() -> list[Case]:
    c = lambda **kw: {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, **kw}  # noqa: E731
    chat = lambda **kw: {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 0, **kw}  # noqa: E731
    return [
        Case("models", "/v1/models", {}, stream=False, method="GET"),
        Case("completion", "/v1/completions", c()),
        Case("completion-adapter", "/v1/completions", c(model=ADAPTER)),
        Case("completion-list-prompt", "/v1/completions", c(prompt=["Hello", "Paris is"])),
        Case("completion-logprobs", "/v1/completions", c(logprobs=3)),
        Case("completion-echo-logprobs", "/v1/completions", c(echo=True, logprobs=2, max_tokens=2), stream=False),
        Case("completion-n2-seed", "/v1/completions", c(n=2, temperature=0.8, seed=7)),
        Case("completion-penalties", "/v1/completions", c(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)),
        Case("completion-logit-bias", "/v1/completions", c(logit_bias={"13": -100, "28": 5})),
        Case("completion-min-tokens", "/v1/completions", c(min_tokens=3, max_tokens=4)),
        Case("completion-stop", "/v1/completions", c(stop=[" Paris"], max_tokens=8)),
        Case("chat", "/v1/chat/completions", chat()),
        Case("chat-adapter", "/v1/chat/completions", chat(model=ADAPTER)),
        Case("chat-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=2)),
        Case("chat-max-completion-tokens", "/v1/chat/completions", chat(max_tokens=None, max_completion_tokens=3)),
        Case("chat-json-object", "/v1/chat/completions", chat(response_format={"type": "json_object"}, max_tokens=24)),
        Case("chat-json-schema", "/v1/chat/completions",
             chat(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}, max_tokens=32)),
        Case("chat-guided-choice", "/v1/chat/completions", chat(guided_choice=["yes", "no"])),
        Case("chat-structured-outputs-choice", "/v1/chat/completions", chat(structured_outputs={"choice": ["yes", "no"]})),
        Case("chat-guided-regex", "/v1/chat/completions", chat(guided_regex="[0-9]{3}")),
        Case("chat-tools-required", "/v1/chat/completions",
             chat(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL], tool_choice="required", max_tokens=96)),
        Case("chat-tools-named", "/v1/chat/completions",
             chat(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL], max_tokens=96,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})),
        Case("chat-tools-none", "/v1/chat/completions",
             chat(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL], tool_choice="none")),
        Case("error-unknown-model", "/v1/completions", c(model="no-such-model"), stream=False),
        Case("error-bad-temperature", "/v1/completions", c(temperature=-1), stream=False),
        Case("error-context-length", "/v1/completions", c(max_tokens=10**6), stream=False),
        Case("load-lora-adapter", "/v1/load_lora_adapter", {"lora_name": "runtime-lora", "lora_path": "<ADAPTER_PATH>"},
             stream=False, admin=True),
        Case("unload-lora-adapter", "/v1/unload_lora_adapter", {"lora_name": "runtime-lora"}, stream=False, admin=True),
    ]


# -- talking to a server ---------------------------------------------------------------------------


def send(client: httpx.Client, case: Case, stream: bool, headers: dict, adapter_path: str) -> dict:
    """{"status", "body"} for a plain response; {"status", "chunks", "done"} for a stream."""
    body = json.loads(json.dumps(case.body).replace("<ADAPTER_PATH>", adapter_path))
    body = {k: v for k, v in body.items() if v is not None}
    if case.method == "GET":
        r = client.get(case.path, headers=headers)
        return {"status": r.status_code, "body": _json(r.text)}
    if not stream:
        r = client.post(case.path, json=body, headers=headers)
        return {"status": r.status_code, "body": _json(r.text)}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    chunks, done = [], False
    with client.stream("POST", case.path, json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": _json(r.read().decode())}
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(_json(line[6:]))
    return {"status": 200, "chunks": chunks, "done": done}


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"<not json>": text[:200]}


# -- comparing -------------------------------------------------------------------------------------


def kind(x) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}.get(type(x), "number")


def diff(a, b, path: str = "$", out: list[str] | None = None) -> list[str]:
    """Differences of structure between a (hotswap) and b (vLLM), as 'path: hotswap ... | vLLM ...' lines."""
    out = [] if out is None else out
    if kind(a) != kind(b):
        out.append(f"{path}: hotswap {kind(a)} {_short(a)} | vLLM {kind(b)} {_short(b)}")
        return out
    if isinstance(a, dict):
        for k in sorted(a.keys() | b.keys()):
            p = f"{path}.{k}"
            if k not in b:
                out.append(f"{p}: only hotswap has it ({kind(a[k])} {_short(a[k])})")
            elif k not in a:
                out.append(f"{p}: only vLLM has it ({kind(b[k])} {_short(b[k])})")
            elif k in VALUE_KEYS and not isinstance(a[k], (dict, list)) and a[k] != b[k]:
                out.append(f"{p}: hotswap {a[k]!r} | vLLM {b[k]!r}")
            elif k in PREFIX_KEYS and isinstance(a[k], str) and isinstance(b[k], str) and a[k].split("-")[0] != b[k].split("-")[0]:
                out.append(f"{p}: id prefix hotswap {a[k].split('-')[0]!r} | vLLM {b[k].split('-')[0]!r}")
            else:
                diff(a[k], b[k], p, out)
    elif isinstance(a, list):
        if len(a) != len(b) and _length_fixed(path):
            out.append(f"{path}: hotswap {len(a)} items | vLLM {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            if i >= 3:  # the same shape repeats: the first items say it
                break
            diff(x, y, f"{path}[{i}]", out)
    return out


def _length_fixed(path: str) -> bool:
    """Lists whose length the request fixes (the rest depend on what the model wrote)."""
    return path.endswith((".choices", ".top_logprobs", ".data", ".tool_calls")) or path == "$"


def _short(x) -> str:
    s = json.dumps(x)
    return s if len(s) <= 60 else s[:57] + "..."


def compare(h: dict, v: dict) -> list[str]:
    out = []
    if h["status"] != v["status"]:
        out.append(f"HTTP status: hotswap {h['status']} | vLLM {v['status']}")
    if "chunks" in h and "chunks" in v:
        if h["done"] != v["done"]:
            out.append(f"[DONE]: hotswap {h['done']} | vLLM {v['done']}")
        hc, vc = h["chunks"], v["chunks"]
        if not hc or not vc:
            return out + [f"chunks: hotswap {len(hc)} | vLLM {len(vc)}"]
        picks = {"first chunk": (hc[0], vc[0]), "second chunk": (hc[min(1, len(hc) - 1)], vc[min(1, len(vc) - 1)]),
                 "last chunk with choices": (_last_with_choices(hc), _last_with_choices(vc)), "last chunk": (hc[-1], vc[-1])}  # fmt: skip
        for label, (a, b) in picks.items():
            out += [f"{label} {line}" for line in diff(a, b)]
        return out
    if "body" in h and "body" in v:
        out += diff(h["body"], v["body"])
    else:
        out.append(f"shape: hotswap {'stream' if 'chunks' in h else 'body'} | vLLM {'stream' if 'chunks' in v else 'body'}")
    return out


def _last_with_choices(chunks: list[dict]) -> dict:
    with_choices = [c for c in chunks if isinstance(c, dict) and c.get("choices")]
    return with_choices[-1] if with_choices else {}


# -- servers ---------------------------------------------------------------------------------------


def model_with_tool_template(model_dir: Path, into: Path) -> Path:
    """The model's files (linked) with a chat template that renders tools, Hermes style."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name not in ("chat_template.jinja",):
            (into / f.name).symlink_to(f.resolve())
    (into / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (into / "tokenizer_config.json").unlink()
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    return into


def start_servers(model_dir: Path, adapter: Path, out: Path, admin_key: str):
    from loadtests.compare import ensure_vllm

    hs_port, vl_port = free_port(), free_port()
    hs = ServerProcess("hotswap", hotswap_cmd(hs_port, model_dir, ["--served-model-name", MODEL, "--enforce-eager", "--quantization", "none",
                                                                   "--adapter", f"{ADAPTER}={adapter}", "--admin-key", admin_key,
                                                                   "--store", str(out / "store")]),
                       f"http://127.0.0.1:{hs_port}", out / "hotswap.log", cwd=repo_root(), ready_path="/health")  # fmt: skip
    py = ensure_vllm(repo_root() / ".venv-vllm")
    cores = os.cpu_count() or 1
    vl = ServerProcess("vllm", [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", MODEL,
                                "--host", "127.0.0.1", "--port", str(vl_port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "16",
                                "--lora-modules", f"{ADAPTER}={adapter}", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                                "--max-model-len", "2048", "--disable-log-stats", "--uvicorn-log-level", "warning", "--api-key", admin_key],
                       f"http://127.0.0.1:{vl_port}", out / "vllm.log", cwd=repo_root(), start_timeout=1800, ready_path="/health",
                       env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "OMP_NUM_THREADS": str(cores),
                            "TOKENIZERS_PARALLELISM": "false", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})  # fmt: skip
    return hs, vl


def run(hs_url: str, vl_url: str, adapter_path: str, admin_key: str, only: list[str] | None, out: Path) -> list[tuple[str, list[str]]]:
    results, raw = [], {}
    with httpx.Client(base_url=hs_url, timeout=300) as h, httpx.Client(base_url=vl_url, timeout=300) as v:
        for case in cases():
            if only and case.name not in only:
                continue
            for stream in (False, True) if case.stream else (False,):
                label = case.name + (" (stream)" if stream else "")
                headers = {"Authorization": f"Bearer {admin_key}"}
                a = send(h, case, stream, headers, adapter_path)
                b = send(v, case, stream, headers, adapter_path)
                raw[label] = {"hotswap": a, "vllm": b}
                results.append((label, compare(a, b)))
                print(f"{label}: {'same' if not results[-1][1] else f'{len(results[-1][1])} difference(s)'}", flush=True)
    (out / "responses.json").write_text(json.dumps(raw, indent=1))
    return results


def split(results: list[tuple[str, list[str]]]) -> tuple[list[tuple[str, list[str]]], dict[str, int]]:
    """(the unexpected differences per case, how often each intentional one was seen)."""
    unexpected, known = [], {}
    for label, differences in results:
        if label.split(" ")[0] in IGNORED_CASES:
            known[IGNORED_CASES[label.split(" ")[0]]] = known.get(IGNORED_CASES[label.split(" ")[0]], 0) + 1
            continue
        left = []
        for d in differences:
            if (why := intentional(d)) is not None:
                known[why] = known.get(why, 0) + 1
            else:
                left.append(d)
        unexpected.append((label, left))
    return unexpected, known


def report(results: list[tuple[str, list[str]]]) -> str:
    unexpected, known = split(results)
    same = sum(not d for _, d in unexpected)
    lines = ["# hotswap vs vLLM: response structure", "", f"{len(results)} cases; {same} the same up to the intentional differences below.", ""]
    for label, differences in unexpected:
        if differences:
            lines += [f"## {label}", *(f"- `{d}`" for d in differences), ""]
    lines += ["## Intentional differences (docs/api.md)", *(f"- {why} ({n} times)" for why, n in known.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("var/conformance"))
    p.add_argument("--only", nargs="+", default=None, help="case names (see cases())")
    p.add_argument("--hotswap-url", default=None, help="an already running hotswap (with --vllm-url; the same model and adapter)")
    p.add_argument("--vllm-url", default=None)
    p.add_argument("--admin-key", default="conformance-admin-key")
    args = p.parse_args(argv)
    from server.models.embedded import ensure_embedded_model

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    model_dir = model_with_tool_template(Path(ensure_embedded_model()), out / "model")
    (_, adapter), = ensure_lora_adapters(model_dir, repo_root() / "var" / "adapters", 1, rank=8)
    if args.hotswap_url and args.vllm_url:
        results = run(args.hotswap_url, args.vllm_url, str(adapter.resolve()), args.admin_key, args.only, out)
    else:
        hs, vl = start_servers(model_dir, adapter.resolve(), out, args.admin_key)
        with hs, vl:
            results = run(hs.url, vl.url, str(adapter.resolve()), args.admin_key, args.only, out)
    text = report(results)
    (out / "report.md").write_text(text)
    print("\n" + text)
    return 1 if any(d for _, d in split(results)[0]) else 0


if __name__ == "__main__":
    sys.exit(main())
