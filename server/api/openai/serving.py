"""From OpenAI requests to engine sequences and back: validation, tokenization, response shapes."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from datetime import datetime

from fastapi import Request

from adapters_store import StoreUnavailable
from server.adapters.service import AdapterService
from server.auth import Principal, api_principal

from server.api.errors import APIError
from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from server.engine.async_engine import AsyncEngine, RequestOutput
from server.engine.sequence import SamplingParams, Sequence
from server.metrics import Metrics


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, metrics: Metrics, adapter_service: AdapterService | None = None):
        self.engine = engine
        self.adapter_service = adapter_service
        self.metrics = metrics
        self.llm = engine.engine
        self.created = int(time.time())

    # -- models ----------------------------------------------------------------------------
    async def list_models(self, raw: Request) -> ModelList:
        principal = await self.principal(raw)
        base = self.llm.model_name
        cards = [ModelCard(id=base, created=self.created, root=str(self.llm.model_dir))]
        cards += [ModelCard(id=name, created=self.created, parent=base) for name in sorted(self.llm.static_adapters)]
        service = self.adapter_service
        if service is not None:
            try:
                manifests = await service.registry.list(principal.tenant if not principal.admin else None)
                if principal.tenant is not None:  # plus other tenants' public adapters
                    manifests += [m for m in await service.registry.list() if m.public and m.tenant != principal.tenant]
            except StoreUnavailable as e:
                raise APIError(503, f"the adapter store is unreachable: {e}", type="service_unavailable", code="store_unavailable", headers={"Retry-After": "5"}) from None
            for m in manifests:
                model_id = m.name if m.tenant == principal.tenant else f"{m.tenant}/{m.name}"
                cards.append(ModelCard(id=model_id, created=_epoch(m.created_at), parent=base, owned_by=m.tenant))
        return ModelList(data=cards)

    async def principal(self, raw: Request) -> Principal:
        state = raw.app.state
        return await api_principal(raw, state.admin_key, state.registry)

    async def resolve_adapter(self, model: str, raw: Request, user: str | None = None) -> tuple[str | None, object | None]:
        """(engine adapter key, host weights to place if not resident) for the request's `model`."""
        principal = await self.principal(raw)
        if model == self.llm.model_name:
            return None, None
        if model in self.llm.static_adapters:
            return model, None
        if self.adapter_service is None:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        manifest = await self.adapter_service.resolve(principal, model)
        return await self.adapter_service.for_request(manifest, user)

    # -- request -> sequences --------------------------------------------------------------
    def _check_supported(self, req: SamplingFields) -> None:
        if req.logprobs:
            raise APIError(400, "logprobs are not supported yet", param="logprobs")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported yet", param="presence_penalty")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def _params(self, req: SamplingFields, prompt_len: int, max_tokens: int | None, choice: int) -> SamplingParams:
        limit = self.llm.max_model_len
        if prompt_len >= limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens, but the prompt has {prompt_len} tokens.",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt", code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested {prompt_len + max_tokens} "
                f"tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded",
            )
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=None if req.seed is None else req.seed + choice, stop=stop,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
        )

    def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        elif p and all(isinstance(x, int) for x in p):
            p = [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        token_lists = [list(x) if isinstance(x, list) else self.llm.tokenizer(x)["input_ids"] for x in p]
        vocab = self.llm.model.config.vocab_size
        for ids in token_lists:
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return token_lists

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        messages = []
        for m in req.messages:
            content = m.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        tok = self.llm.tokenizer
        if not tok.chat_template:
            raise APIError(400, f"model `{self.llm.model_name}` has no chat template: use /v1/completions", param="messages")
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    # -- running ---------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        self._check_supported(req)
        if req.echo or req.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix")
        prompts = self._completion_prompts(req)
        adapter, weights = await self.resolve_adapter(req.model, raw, req.user)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # the legacy endpoint's default
        seqs = [
            Sequence(ids, self._params(req, len(ids), max_tokens, j), adapter, adapter_weights=weights)
            for ids in prompts for j in range(req.n)
        ]
        return await self._run("completions", req, seqs, raw, chat=False)

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self._check_supported(req)
        ids = self._chat_prompt(req)
        adapter, weights = await self.resolve_adapter(req.model, raw, req.user)
        max_tokens = req.max_completion_tokens or req.max_tokens
        seqs = [Sequence(ids, self._params(req, len(ids), max_tokens, j), adapter, adapter_weights=weights) for j in range(req.n)]
        return await self._run("chat", req, seqs, raw, chat=True)

    async def _run(self, endpoint: str, req: SamplingFields, seqs: list[Sequence], raw: Request, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        for s in seqs:
            s.request_id = rid
        created = int(time.time())
        prompt_tokens = sum(len(s.prompt_token_ids) for s in seqs[:: req.n])  # each prompt counts once, whatever n
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(endpoint, rid, created, req.model, seqs, chat, prompt_tokens if include_usage else None)
        task = asyncio.ensure_future(self._collect(endpoint, seqs))
        # A client that hangs up gets its sequences aborted (and their KV blocks freed) right away.
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await raw.is_disconnected():
                task.cancel()
                self.metrics.requests.labels(endpoint, "abort").inc()
                raise APIError(499, "client disconnected", type="client_closed")
        results = task.result()
        choices = []
        for i, (text, reason, _) in enumerate(results):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
        completion_tokens = sum(n for _, _, n in results)
        return {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": req.model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        }

    async def _collect(self, endpoint: str, seqs: list[Sequence]) -> list[tuple[str, str | None, int]]:
        results: list[list] = [["", None, 0] for _ in seqs]
        async for i, out in self._merged(endpoint, seqs):
            results[i][0] += out.text
            results[i][1], results[i][2] = out.finish_reason, out.num_output_tokens
        return [tuple(r) for r in results]

    async def _merged(self, endpoint: str, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several sequences as they come, tagged with the choice index; records metrics."""
        start = time.perf_counter()
        if len(seqs) == 1:
            async for out in self._timed(endpoint, seqs[0], start):
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, seq: Sequence) -> None:
            try:
                async for out in self._timed(endpoint, seq, start):
                    await merged.put((i, out))
            except BaseException as e:
                await merged.put((i, e))
                raise

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(seqs)]
        remaining = len(seqs)
        try:
            while remaining:
                i, out = await merged.get()
                if isinstance(out, BaseException):
                    raise out
                if out.finished:
                    remaining -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    async def _timed(self, endpoint: str, seq: Sequence, start: float) -> AsyncIterator[RequestOutput]:
        m = self.metrics
        first = None
        finished = False
        try:
            async for out in self.engine.generate(seq):
                if first is None and out.token_ids:
                    first = time.perf_counter()
                    m.ttft.observe(first - start)
                if out.finished:
                    finished = True
                    end = time.perf_counter()
                    m.latency.observe(end - start)
                    if out.num_output_tokens > 1:
                        m.tpot.observe((end - first) / (out.num_output_tokens - 1))
                    m.prompt_tokens.inc(out.num_prompt_tokens)
                    m.generation_tokens.inc(out.num_output_tokens)
                    m.requests.labels(endpoint, out.finish_reason or "unknown").inc()
                yield out
        finally:
            if not finished:
                m.requests.labels(endpoint, "abort").inc()

    async def _stream(self, endpoint, rid, created, model, seqs, chat: bool, usage_prompt_tokens: int | None) -> AsyncIterator[str]:
        """SSE chunks; with usage_prompt_tokens set, a final usage chunk as stream_options.include_usage asks."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(len(seqs))])
        completion_tokens = [0] * len(seqs)
        try:
            async for i, out in self._merged(endpoint, seqs):
                completion_tokens[i] = out.num_output_tokens
                if not out.text and not out.finished:
                    continue
                reason = out.finish_reason if out.finished else None
                if chat:
                    delta = {"content": out.text} if out.text else {}
                    yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}])
                else:
                    yield chunk([{"index": i, "text": out.text, "logprobs": None, "finish_reason": reason}])
        except RuntimeError as e:  # engine failure mid-stream: tell the client in-band
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            return
        if usage_prompt_tokens is not None:
            total = sum(completion_tokens)
            yield chunk([], {"prompt_tokens": usage_prompt_tokens, "completion_tokens": total, "total_tokens": usage_prompt_tokens + total})
        yield "data: [DONE]\n\n"


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
