"""The naive baseline for loadtests/compare.py: Hugging Face transformers + peft behind the same
OpenAI streaming `/v1/completions`, one request at a time, switching adapters per request.

What a team without a multi-adapter server would write: one PeftModel; a request for adapter X loads
it on demand (`load_adapter`, at most `--max-loaded` kept, least recently used deleted), makes it
active (`set_adapter`) and decodes token by token with the KV cache; the base model runs with the
adapters disabled. No batching: requests queue for one lock.

    python -m loadtests.naive_server --model DIR --adapters-dir DIR --port 8001
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class NaiveEngine:
    def __init__(self, model_dir: Path, adapters: dict[str, Path], max_loaded: int = 8, served_name: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = served_name or Path(model_dir).name
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.adapters = dict(adapters)
        self.max_loaded = max(1, max_loaded)
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.model = None  # a PeftModel once the first adapter is loaded
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()
        self.lock = asyncio.Lock()  # one request at a time
        self.loads = 0

    def _activate(self, name: str | None):
        """The module to call for this request (adapter loaded and active, or the base)."""
        if name is None:
            return self.model if self.model is not None else self.base
        if self.model is None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.base, str(self.adapters[name]), adapter_name=name).eval()
            self.loads += 1
        elif name not in self.loaded:
            self.model.load_adapter(str(self.adapters[name]), adapter_name=name)
            self.loads += 1
        self.loaded[name] = None
        self.loaded.move_to_end(name)
        self.model.set_adapter(name)
        while len(self.loaded) > self.max_loaded:
            old, _ = self.loaded.popitem(last=False)
            self.model.delete_adapter(old)
        return self.model

    def generate(self, adapter: str | None, prompt_ids: list[int], max_tokens: int, temperature: float, ignore_eos: bool,
                 seed: int | None, emit, cancelled: threading.Event) -> str:
        """Runs on a worker thread; emit(token_id) per token. Returns the finish reason."""
        model = self._activate(adapter)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        ctx = model.disable_adapter() if adapter is None and model is not self.base else _null()
        with torch.inference_mode(), ctx:
            ids = torch.tensor([prompt_ids])
            out = model(input_ids=ids, use_cache=True)
            for i in range(max_tokens):
                logits = out.logits[0, -1].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    tok = int(torch.argmax(logits))
                emit(tok)
                if cancelled.is_set():
                    return "abort"
                if tok in self.eos_ids and not ignore_eos:
                    return "stop"
                if i + 1 == max_tokens:
                    break
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        return "length"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def build_app(engine: NaiveEngine) -> FastAPI:
    app = FastAPI(title="naive hf+peft")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "adapters_loaded": list(engine.loaded), "adapter_loads": engine.loads}

    @app.get("/v1/models")
    async def models():
        ids = [engine.model_name, *engine.adapters]
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "naive"} for m in ids]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model = body.get("model")
        if model != engine.model_name and model not in engine.adapters:
            return _error(404, f"model {model!r} not found", "not_found_error")
        adapter = None if model == engine.model_name else model
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            return _error(400, "prompt must be a string here")
        prompt_ids = engine.tokenizer(prompt)["input_ids"]
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) or 0.0)
        ignore_eos = bool(body.get("ignore_eos", False))
        seed = body.get("seed")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        loop = asyncio.get_running_loop()

        async def run(queue: asyncio.Queue, cancelled: threading.Event):
            def emit(tok):
                loop.call_soon_threadsafe(queue.put_nowait, ("tok", tok))

            try:
                reason = await asyncio.to_thread(engine.generate, adapter, prompt_ids, max_tokens, temperature, ignore_eos, seed, emit, cancelled)
                queue.put_nowait(("done", reason))
            except Exception as e:  # noqa: BLE001
                queue.put_nowait(("error", f"{type(e).__name__}: {e}"))

        def chunk(choices, usage=None):
            d = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
            if usage is not None:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        if not body.get("stream"):
            async with engine.lock:
                queue: asyncio.Queue = asyncio.Queue()
                await run(queue, threading.Event())
                toks, reason = [], "length"
                while not queue.empty():
                    kind, v = queue.get_nowait()
                    if kind == "tok":
                        toks.append(v)
                    elif kind == "error":
                        return _error(500, v, "server_error")
                    else:
                        reason = v
            text = engine.tokenizer.decode(toks, skip_special_tokens=True)
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(toks), "total_tokens": len(prompt_ids) + len(toks)}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}], "usage": usage}

        async def stream():
            cancelled = threading.Event()
            async with engine.lock:
                queue: asyncio.Queue = asyncio.Queue()
                task = asyncio.create_task(run(queue, cancelled))
                toks: list[int] = []
                sent = ""
                try:
                    while True:
                        kind, v = await queue.get()
                        if kind == "tok":
                            toks.append(v)
                            text = engine.tokenizer.decode(toks, skip_special_tokens=True)
                            if text.endswith("\ufffd"):
                                continue  # an incomplete UTF-8 sequence: wait for the next token
                            delta, sent = text[len(sent):], text
                            yield chunk([{"index": 0, "text": delta, "logprobs": None, "finish_reason": None}])
                        elif kind == "error":
                            yield f"data: {json.dumps({'error': {'message': v, 'type': 'server_error'}})}\n\n"
                            return
                        else:
                            yield chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": v}])
                            break
                    if include_usage:
                        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(toks), "total_tokens": len(prompt_ids) + len(toks)}
                        yield chunk([], usage)
                    yield "data: [DONE]\n\n"
                finally:
                    cancelled.set()  # client gone (or done): the worker thread stops at its next token
                    await asyncio.shield(task)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--adapters-dir", type=Path, default=None, help="every subdirectory with adapter_config.json, named after it")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-loaded", type=int, default=8, help="adapters kept loaded in the PeftModel (LRU)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = {}
    if args.adapters_dir:
        adapters = {d.name: d for d in sorted(args.adapters_dir.iterdir()) if (d / "adapter_config.json").is_file()}
    engine = NaiveEngine(args.model, adapters, args.max_loaded, args.served_model_name)
    uvicorn.run(build_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
