"""From OpenAI requests to engine sequences and back: limits, tokenization, response shapes.

The caller was authenticated and the body capped before it was read (server.api.guard), and the
fields were validated strictly on parsing (protocol.py). A tenant's request is first held to its
quotas (server.api.quotas): in flight and per minute before anything else, tokens per minute again
once its prompt is tokenized. What is checked next needs the model: the prompt's length in tokens,
`n` and the KV cache a request could claim. Prompts too long to be
within the limit are refused from their length in characters, without tokenizing them, and large
inputs are tokenized on a worker thread so that the event loop keeps answering everyone else.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from datetime import datetime

from fastapi import Request

from adapters_store.tenants import DEFAULT_SETTINGS
from server.adapters.service import RUNTIME_TENANT, AdapterService
from server import __version__
from server.api.errors import APIError, error_body, to_api_error
from server.api.limits import RequestLimits
from server.api.openai.lora_adapters import LORA_PATH_KEY
from server.api.openai.merging import resolve_merged
from server.api.openai.logprobs import ResponseLogprobs
from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, SamplingFields
from server.api.openai.structured import guided_spec
from server.api.openai.tools import ToolPlan, plan_tools, template_message
from server.api.quotas import Lease, QuotaExceeded, TenantQuotas
from server.auth import Principal
from server.engine.client import EngineClient, RequestFailed, RequestOutput, SamplingParams, Sequence
from server.errors import ModelNotFound
from server.metrics import Metrics, tenant_label

log = logging.getLogger(__name__)


class OpenAIServing:
    def __init__(self, engine: EngineClient, metrics: Metrics, limits: RequestLimits, adapter_service: AdapterService | None = None,
                 quotas: TenantQuotas | None = None):  # fmt: skip
        self.engine = engine
        self.adapter_service = adapter_service
        self.metrics = metrics
        self.limits = limits
        self.quotas = quotas or TenantQuotas()
        self.created = int(time.time())
        # OpenAI's system_fingerprint: which build and which base weights answered (vLLM: "vllm-<version>-<hash>")
        self.system_fingerprint = f"hotswap-{__version__}-{hashlib.sha256(engine.base_fingerprint.encode()).hexdigest()[:8]}"
        self.engine_limits = engine.limits
        context = engine.limits.max_model_len - 1  # at least one token must be left to generate
        self.max_prompt_tokens = min(limits.max_prompt_tokens or context, context)

    # -- models ----------------------------------------------------------------------------
    async def list_models(self, raw: Request) -> ModelList:
        principal = self.principal(raw)
        base = self.engine.model_name
        # where the weights live on disk is the operator's business, not a tenant's
        context = self.engine_limits.max_model_len
        cards = [ModelCard(id=base, created=self.created, root=str(self.engine.model_dir) if principal.admin else base, max_model_len=context)]
        cards += [ModelCard(id=name, created=self.created, root=name, parent=base) for name in sorted(self.engine.static_adapters)]
        service = self.adapter_service
        if service is not None:  # a store outage is a 503 that names no store (server.api.errors)
            manifests = await service.registry.list(principal.tenant if not principal.admin else None)
            if principal.tenant is not None:  # plus other tenants' public adapters
                manifests += [m for m in await service.registry.list() if m.public and m.tenant != principal.tenant]
            own = {m.name for m in manifests if m.tenant == principal.tenant}
            for m in manifests:
                # the id `model` takes (AdapterService.resolve): runtime-loaded adapters by bare name unless one's own shadows it
                bare = m.tenant == principal.tenant or (m.tenant == RUNTIME_TENANT and m.name not in own)
                model_id = m.name if bare else f"{m.tenant}/{m.name}"
                # vLLM's LoRA cards: root = the path it was loaded from (the admin's business), parent = the base model
                root = (m.provenance or {}).get(LORA_PATH_KEY) if principal.admin else None
                cards.append(ModelCard(id=model_id, created=_epoch(m.created_at), root=root if isinstance(root, str) else model_id, parent=base,
                                       owned_by=m.tenant))  # fmt: skip
        return ModelList(data=cards)

    @staticmethod
    def principal(raw: Request) -> Principal:
        """The caller, as the guard found it from the headers before the body was read (server.api.guard)."""
        principal = getattr(raw.state, "principal", None)
        if principal is None:  # fail closed if the guard did not see this route
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return principal

    async def admit(self, raw: Request) -> Lease:
        """Hold the caller to its tenant's quotas (429 if over one); the lease's weight is its share."""
        tenant = self.principal(raw).tenant
        settings = DEFAULT_SETTINGS
        if tenant is not None and self.adapter_service is not None:
            settings = await self.adapter_service.registry.tenant_settings(tenant)  # cached: adapters_store.tenants
        try:
            return self.quotas.admit(tenant, settings)
        except QuotaExceeded as e:
            self.metrics.rate_limited.labels(tenant_label(tenant), e.limit).inc()
            raise

    def charge_prompt(self, lease: Lease, num_tokens: int) -> None:
        try:
            lease.charge_prompt(num_tokens)
        except QuotaExceeded as e:
            self.metrics.rate_limited.labels(tenant_label(lease.tenant), e.limit).inc()
            raise

    async def resolve_adapter(self, model: str, raw: Request, user: str | None = None, members=None,
                              merge_strategy: str | None = None) -> tuple[str | None, object | None, str]:  # fmt: skip
        """(engine adapter key, host weights to place if not resident, content identity for the prefix
        cache) for the request's `model`, or for its `adapters` merged into one (server.api.openai.merging)."""
        if members is not None or merge_strategy is not None:
            return await resolve_merged(self, model, raw, user, members, merge_strategy)
        if model == self.engine.model_name:
            return None, None, ""
        if model in self.engine.static_adapters:
            return model, None, f"static:{model}"  # loaded once at start-up, never replaced
        if self.adapter_service is None:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        manifest = await self.adapter_service.resolve(self.principal(raw), model)
        return await self.adapter_service.for_request(manifest, user)

    # -- request -> sequences --------------------------------------------------------------
    def _check_supported(self, req: SamplingFields) -> None:
        if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.n > self.limits.max_n:
            raise APIError(400, f"n must be at most {self.limits.max_n} on this server", param="n")
        vocab = self.engine_limits.vocab_size
        if any(t >= vocab for t in req.stop_token_ids or ()):
            raise APIError(400, f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids")
        self._logit_bias(req)

    def _logit_bias(self, req: SamplingFields) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs: ids within the vocabulary, each named once ("7" and "07" are one id)."""
        vocab = self.engine_limits.vocab_size
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            token = int(key)  # the schema allows digits only
            if token >= vocab or token in bias:
                raise APIError(400, f"logit_bias keys must be distinct token ids in [0, {vocab}): {key!r} is not", param="logit_bias")
            bias[token] = value
        return tuple(bias.items())

    @staticmethod
    def _chat_guided(req: ChatCompletionRequest, tools: ToolPlan | None):
        """The chat request's output constraint: its own (server.api.openai.structured) or its tool_choice's."""
        spec = guided_spec(req)
        if tools is not None and tools.guided is not None:
            if spec is not None:
                raise APIError(400, "a tool_choice that forces a call constrains the output itself: drop response_format / guided_*",
                               param="tool_choice")  # fmt: skip
            spec = tools.guided
        return spec

    async def _compile(self, spec, req: SamplingFields):
        """The spec's grammar, compiled off the event loop (GuidedError, a 400 with the reason, if it cannot be)."""
        if spec is not None and req.min_tokens:
            # min_tokens holds end-of-text back, but a grammar may be complete sooner: then no token is left to sample
            raise APIError(400, "min_tokens cannot be combined with structured output: a complete structure may end sooner",
                           param="min_tokens")  # fmt: skip
        return None if spec is None else await self.engine.compile_guided(spec)

    @staticmethod
    def _guide(seqs: list[Sequence], spec, grammar) -> None:
        """Every sequence of the request follows the grammar; each gets its own matcher in the engine."""
        if spec is None:
            return
        for s in seqs:
            s.params.guided, s.grammar = spec, grammar

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_tokens * self.engine_limits.max_chars_per_token:
            raise self._prompt_too_long(f"{chars} characters, more than {self.max_prompt_tokens} tokens can hold", param)

    def _check_prompt_tokens(self, num_tokens: int, param: str) -> None:
        if num_tokens > self.max_prompt_tokens:
            raise self._prompt_too_long(f"{num_tokens} tokens", param)

    def _prompt_too_long(self, size: str, param: str) -> APIError:
        context = self.engine_limits.max_model_len
        if self.max_prompt_tokens == context - 1:
            return APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has {size}.", param=param, code="context_length_exceeded")
        return APIError(400, f"This server accepts prompts of at most {self.max_prompt_tokens} tokens (--max-prompt-tokens), but the prompt has {size}.",
                        param=param, code="context_length_exceeded")  # fmt: skip

    def _sequences(self, req: SamplingFields, prompts: list[list[int]], max_tokens: int | None, adapter, weights, identity: str,
                   lease: Lease) -> list[Sequence]:
        """n sequences per prompt, within the engine's batch width and its KV cache."""
        count, limits = len(prompts) * req.n, self.engine_limits
        if count > limits.max_num_seqs:
            raise APIError(400, f"this request asks for {count} sequences (prompts x n); the server runs at most {limits.max_num_seqs} at once",
                           param="n" if len(prompts) == 1 else "prompt")  # fmt: skip
        context = limits.max_model_len
        bias = self._logit_bias(req)
        # All of a request's sequences may run at once, so together they must fit the KV cache.
        share = limits.kv_cache_tokens // count
        seqs = []
        for ids in prompts:
            wanted = max_tokens
            if wanted is None:
                wanted = min(context, share) - len(ids)
                if wanted < 1:
                    raise APIError(400, f"no room is left to generate: {count} sequences of {len(ids)} prompt tokens fill the "
                                        f"KV cache of {limits.kv_cache_tokens} tokens; lower n", param="n")  # fmt: skip
            elif len(ids) + wanted > context:
                raise APIError(
                    400, f"This model's maximum context length is {context} tokens. However, you requested {len(ids) + wanted} "
                    f"tokens ({len(ids)} in the prompt, {wanted} for the completion). Reduce the prompt or max_tokens.",
                    param="max_tokens", code="context_length_exceeded",
                )
            if req.min_tokens > wanted:
                raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({wanted})", param="min_tokens")
            # the prompt's first choice computes it; the others wait for it and share its KV blocks (server.engine.scheduler)
            first = None
            for j in range(req.n):
                seq = Sequence(ids, self._params(req, wanted, j, bias), adapter, adapter_weights=weights, tenant=lease.tenant,
                               tenant_weight=lease.weight, prefix_identity=identity, prefill_parent=first, streamed=req.stream)  # fmt: skip
                first = first or seq
                seqs.append(seq)
        claimed = sum(s.num_tokens + s.params.max_tokens for s in seqs)
        if claimed > limits.kv_cache_tokens:
            raise APIError(400, f"this request could claim {claimed} tokens of KV cache (prompt + max_tokens for each of its {count} "
                                f"sequences), more than the server's {limits.kv_cache_tokens}: lower n or max_tokens", param="max_tokens")  # fmt: skip
        return seqs

    @staticmethod
    def _logprobs(req: SamplingFields) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs)."""
        if isinstance(req, ChatCompletionRequest):
            return (req.top_logprobs or 0) if req.logprobs else None
        return req.logprobs

    @classmethod
    def _params(cls, req: SamplingFields, max_tokens: int, choice: int, logit_bias: tuple = ()) -> SamplingParams:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        k = cls._logprobs(req)
        # an echoed prompt's logprobs: computed by each prompt's first choice only (ResponseLogprobs shares them)
        echo_k = k if choice % req.n == 0 and isinstance(req, CompletionRequest) and req.echo else None
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
            seed=None if req.seed is None else req.seed + choice, stop=stop,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens, logit_bias=logit_bias, logprobs=k, prompt_logprobs=echo_k,
        )

    async def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        elif p and all(isinstance(x, int) for x in p):
            p = [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        max_seqs = self.engine_limits.max_num_seqs
        if len(p) * req.n > max_seqs:  # before tokenizing any of them
            raise APIError(400, f"this request asks for {len(p) * req.n} sequences (prompts x n); the server runs at most {max_seqs} at once",
                           param="prompt")  # fmt: skip
        vocab = self.engine_limits.vocab_size
        token_lists = []
        for x in p:
            if isinstance(x, str):
                self._check_prompt_chars(len(x), "prompt")
                ids = await self.engine.tokenize(x)
            else:
                ids = list(x)
                if any(t >= vocab for t in ids):
                    raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            self._check_prompt_tokens(len(ids), "prompt")
            token_lists.append(ids)
        return token_lists

    async def _chat_prompt(self, req: ChatCompletionRequest, tools: ToolPlan | None = None) -> list[int]:
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported", param=f"messages.{i}.content")
                content = "".join(part.text for part in content)
            messages.append(template_message(m, content or ""))
        if not self.engine.has_chat_template:
            raise APIError(400, f"model `{self.engine.model_name}` has no chat template: use /v1/completions", param="messages")
        if len(messages) > self.max_prompt_tokens:  # the template spends at least a token on each
            raise self._prompt_too_long(f"{len(messages)} messages", "messages")
        tools_chars = len(json.dumps(tools.tools)) if tools is not None else 0  # the template renders them too
        self._check_prompt_chars(sum(len(m["content"]) for m in messages) + tools_chars, "messages")
        ids = await self.engine.render_chat(messages, tools.tools if tools is not None else None)
        self._check_prompt_tokens(len(ids), "messages")
        return ids

    # -- running ---------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request):
        lease = await self.admit(raw)
        try:
            self._check_supported(req)
            if req.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
            spec = guided_spec(req)
            prompts = await self._completion_prompts(req)
            self.charge_prompt(lease, sum(len(ids) for ids in prompts))
            grammar = await self._compile(spec, req)
            adapter, weights, identity = await self.resolve_adapter(req.model, raw, req.user, req.adapter_members, req.merge_strategy)
            max_tokens = 16 if req.max_tokens is None else req.max_tokens  # the legacy endpoint's default
            seqs = self._sequences(req, prompts, max_tokens, adapter, weights, identity, lease)
            self._guide(seqs, spec, grammar)
            echo = [p if isinstance(p, str) else self.engine.detokenize(ids) for p, ids in zip(self._prompt_list(req), prompts)] if req.echo else None
            return await self._run("completions", req, seqs, raw, lease, chat=False, render=self._render(req, False, prompts, echo))
        except BaseException:
            lease.release()
            raise

    async def chat(self, req: ChatCompletionRequest, raw: Request):
        lease = await self.admit(raw)
        try:
            self._check_supported(req)
            tools = plan_tools(req, self.engine.chat_template_uses_tools, self.engine.model_name)
            spec = self._chat_guided(req, tools)
            ids = await self._chat_prompt(req, tools)
            self.charge_prompt(lease, len(ids))
            grammar = await self._compile(spec, req)
            adapter, weights, identity = await self.resolve_adapter(req.model, raw, req.user, req.adapter_members, req.merge_strategy)
            seqs = self._sequences(req, [ids], req.max_completion_tokens or req.max_tokens, adapter, weights, identity, lease)
            self._guide(seqs, spec, grammar)
            if tools is not None and tools.mode == "none":
                tools = None  # rendered for the model to see, never parsed
            return await self._run("chat", req, seqs, raw, lease, chat=True, render=self._render(req, True, [ids], None), tools=tools)
        except BaseException:
            lease.release()
            raise

    @staticmethod
    def _prompt_list(req: CompletionRequest) -> list:
        """The request's prompts as given (a text or token ids each), in order."""
        p = req.prompt
        return [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)

    def _render(self, req: SamplingFields, chat: bool, prompts: list[list[int]], echo: list[str] | None) -> ResponseLogprobs | None:
        k = self._logprobs(req)
        if k is None and echo is None:
            return None
        return ResponseLogprobs(self.engine.token_strings, chat, k, req.n, prompts, echo)

    async def _run(self, endpoint: str, req: SamplingFields, seqs: list[Sequence], raw: Request, lease: Lease, chat: bool,
                   render: ResponseLogprobs | None = None, tools: ToolPlan | None = None):  # fmt: skip
        """The response, or for a stream its chunks; the request's lease is released when either ends."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        for s in seqs:
            s.request_id = rid
        created = int(time.time())
        prompt_tokens = sum(len(s.prompt_token_ids) for s in seqs[:: req.n])  # each prompt counts once, whatever n
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self._stream(endpoint, rid, created, req.model, seqs, chat, prompt_tokens if include_usage else None, lease, render, tools,
                                  req.n)  # fmt: skip
            # The stream's own `finally` releases the lease; a stream never started (the client left
            # before the first chunk) never runs it, so its collection does.
            weakref.finalize(stream, lease.release)
            return stream
        try:
            return await self._respond(endpoint, req, seqs, raw, lease, chat, rid, created, prompt_tokens, render, tools)
        finally:
            lease.release()

    async def _respond(self, endpoint: str, req: SamplingFields, seqs: list[Sequence], raw: Request, lease: Lease, chat: bool,
                       rid: str, created: int, prompt_tokens: int, render: ResponseLogprobs | None = None,
                       tools: ToolPlan | None = None) -> dict:  # fmt: skip
        task = asyncio.ensure_future(self._collect(endpoint, seqs, lease))
        # A client that hangs up gets its sequences aborted (and their KV blocks freed) right away.
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done and await raw.is_disconnected():
                task.cancel()  # each of its sequences counts itself as aborted (_timed)
                raise APIError(499, "client disconnected", type="client_closed")
        try:
            results = task.result()
        except RequestFailed as e:
            raise to_api_error(e) from None
        choices = []
        if render is not None:
            for i, r in enumerate(results):
                render.note_prompt(i, r[5])
        for i, (text, reason, _, token_ids, logprobs, _) in enumerate(results):
            logprobs = render.logprobs(i, token_ids, logprobs, first=True) if render is not None else None
            if chat:
                message, called = tools.message(text) if tools is not None else ({"role": "assistant", "content": text}, False)
                message |= {"refusal": None, "annotations": None, "audio": None, "function_call": None}  # OpenAI's message fields
                reason = tools.finish_reason(reason, called) if tools is not None else reason
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
            else:
                text = render.prefix(i) + text if render is not None else text
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
        completion_tokens = sum(r[2] for r in results)
        return {
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": req.model,
            "choices": choices, "service_tier": None, "system_fingerprint": self.system_fingerprint,
            "usage": _usage(prompt_tokens, completion_tokens, seqs, req.n, details=True),
        }

    async def _collect(self, endpoint: str, seqs: list[Sequence], lease: Lease) -> list[tuple]:
        """Per sequence: (text, finish reason, output tokens, token ids, their logprobs, the prompt's logprobs)."""
        results: list[list] = [["", None, 0, [], [], None] for _ in seqs]
        async for i, out in self._merged(endpoint, seqs, lease):
            results[i][0] += out.text
            results[i][1], results[i][2] = out.finish_reason, out.num_output_tokens
            results[i][3] += out.token_ids
            results[i][4] += out.logprobs or []
            if out.prompt_logprobs is not None:
                results[i][5] = out.prompt_logprobs
        return [tuple(r) for r in results]

    async def _merged(self, endpoint: str, seqs: list[Sequence], lease: Lease) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several sequences as they come, tagged with the choice index; records metrics."""
        start = time.perf_counter()
        if len(seqs) == 1:
            async for out in self._timed(endpoint, seqs[0], start, lease):
                yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, seq: Sequence) -> None:
            try:
                async for out in self._timed(endpoint, seq, start, lease):
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

    async def _timed(self, endpoint: str, seq: Sequence, start: float, lease: Lease) -> AsyncIterator[RequestOutput]:
        """One sequence's outputs; records its metrics and charges its generated tokens to the lease."""
        m, tenant = self.metrics, tenant_label(seq.tenant)
        first = None
        outcome = "abort"
        charged = 0  # output tokens charged to the tenant's token window so far
        try:
            async for out in self.engine.generate(seq):
                lease.charge(out.num_output_tokens - charged)
                charged = out.num_output_tokens
                if first is None and out.token_ids:
                    first = time.perf_counter()
                    m.ttft.labels(tenant).observe(first - start)
                    if seq.first_scheduled_time is not None:  # set by the scheduler on the engine thread
                        m.queue_time.labels(tenant).observe(max(0.0, seq.first_scheduled_time - seq.arrival_time))
                if out.finished:
                    outcome = out.finish_reason or "unknown"
                    end = time.perf_counter()
                    m.latency.observe(end - start)
                    if out.num_output_tokens > 1:
                        m.tpot.observe((end - first) / (out.num_output_tokens - 1))
                    m.prompt_tokens.labels(tenant).inc(out.num_prompt_tokens)
                    m.generation_tokens.labels(tenant).inc(out.num_output_tokens)
                yield out
        except RequestFailed:
            outcome = "error"
            raise
        finally:
            m.requests.labels(endpoint, outcome, tenant).inc()
            if seq.first_scheduled_time is not None:  # it reached the batch, so its prompt met the prefix cache
                m.prefix_queried.labels(tenant).inc(len(seq.prompt_token_ids))
                m.prefix_hits.labels(tenant).inc(seq.num_cached_tokens)

    async def _stream(self, endpoint, rid, created, model, seqs, chat: bool, usage_prompt_tokens: int | None, lease: Lease,
                      render: ResponseLogprobs | None = None, tools: ToolPlan | None = None, n: int = 1) -> AsyncIterator[str]:  # fmt: skip
        """SSE chunks; with usage_prompt_tokens set, a final usage chunk as stream_options.include_usage asks.
        The lease is released when generation ends, however it ends (finished, failed, the client gone)."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": self.system_fingerprint, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        completion_tokens = [0] * len(seqs)
        streamers = [tools.streamer() for _ in seqs] if tools is not None else None  # each choice's text -> tool call deltas
        started = [False] * len(seqs)  # a choice's first chunk carries its echoed prompt
        chars = [0] * len(seqs)  # text sent so far per choice: where the next chunk's text_offset starts
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None} for i in range(len(seqs))])
            async for i, out in self._merged(endpoint, seqs, lease):
                completion_tokens[i] = out.num_output_tokens
                # a token with no text yet (part of a character, or held back by a stop string) still has its logprobs
                if not out.text and not out.finished and not (render is not None and render.k is not None and out.token_ids):
                    continue
                reason = out.finish_reason if out.finished else None
                logprobs = None
                if render is not None:
                    render.note_prompt(i, out.prompt_logprobs)
                    logprobs = render.logprobs(i, out.token_ids, out.logprobs, first=not started[i], text_offset=chars[i])
                if chat and streamers is not None:
                    deltas = streamers[i].feed(out.text, out.finished) or [{}]
                    if out.finished:
                        reason = tools.finish_reason(reason, streamers[i].called)
                    for delta in deltas[:-1]:
                        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    yield chunk([{"index": i, "delta": deltas[-1], "logprobs": logprobs, "finish_reason": reason}])
                elif chat:
                    delta = {"content": out.text} if out.text else {}
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}])
                else:
                    text = out.text if started[i] or render is None else render.prefix(i) + out.text
                    chars[i] += len(text)
                    yield chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}])
                started[i] = True
        except RequestFailed as e:  # the status line is long gone: tell the client in-band, as vLLM does
            error = to_api_error(e)
            yield f"data: {json.dumps(error_body(error.message, error.type, error.param, error.code))}\n\n"
            yield "data: [DONE]\n\n"
            return
        finally:
            lease.release()
        if usage_prompt_tokens is not None:
            total = sum(completion_tokens)
            yield chunk([], _usage(usage_prompt_tokens, total, seqs, n, details=False))
        yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, seqs: list[Sequence], n: int, details: bool) -> dict:
    """OpenAI's usage, with the prompt tokens the prefix cache supplied (each prompt once, whatever n); a whole
    response's also carries completion_tokens_details (null: no reasoning or audio tokens), a stream's last
    chunk does not (as vLLM's)."""
    cached = sum(s.num_cached_tokens for s in seqs[::n])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
    return usage | {"completion_tokens_details": None} if details else usage


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
