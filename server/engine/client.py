"""The engine as the HTTP layer sees it: one narrow client object, and nothing else of the engine.

Everything the API needs goes through `EngineClient`: the model's name and limits, tokenization
and chat templates, submitting requests and streaming their outputs, validating adapter files,
and the device residency of adapters (pin, unpin, evict). Work on adapter pools runs on the
engine thread between steps; parsing, tokenizing large inputs and rendering templates run on
worker threads. Failures arrive as domain errors (`server.errors`, `RequestFailed`), which the
HTTP layer maps to statuses in one place.
"""
from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta
from jinja2 import TemplateError

from server.engine import guided
from server.engine.guided import GuidedError, GuidedSpec, check_spec
from server.engine.async_engine import AsyncEngine, RequestOutput
from server.engine.llm_engine import LLMEngine
from server.engine.token_strings import TokenStrings
from server.engine.sequence import MAX_LOGIT_BIAS, MAX_LOGPROBS, MIN_TEMPERATURE, RequestFailed, SamplingParams, Sequence, TokenLogprob
from server.errors import InvalidRequest, NoRoom, NotPinnable
from server.families.registry import FAMILIES
from server.lora.peft import CONFIG_FILE, WEIGHTS_FILE
from server.models.config import ModelConfig

# What requests are made of, re-exported for the HTTP layer (it imports this module only).
__all__ = ["EngineClient", "TextOps", "EngineLimits", "AdapterSummary", "LLMEngine", "RequestFailed", "RequestOutput", "SamplingParams", "Sequence",
           "MIN_TEMPERATURE", "MAX_LOGPROBS", "MAX_LOGIT_BIAS", "TokenLogprob", "TokenStrings", "ADAPTER_FILES"]

__all__ += ["GuidedSpec", "GuidedError", "check_spec"]  # structured output (server.engine.guided), for the HTTP layer

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what an adapter upload is made of (every family uses PEFT's two file names)

# Inputs longer than this (characters) are tokenized, and chat templates rendered, on a worker thread.
OFFLOAD_CHARS = 16_384
# What a chat template adds around each message (role markers, separators), counted towards OFFLOAD_CHARS.
TEMPLATE_CHARS_PER_MESSAGE = 32


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_model_len: int  # the context: prompt + completion tokens of one sequence
    max_num_seqs: int  # sequences in one batch
    kv_cache_tokens: int  # tokens the KV cache holds, all sequences together
    vocab_size: int
    max_lora_rank: int
    # No token covers more characters than its own string in the vocabulary has (byte-level BPE: one
    # per byte; SentencePiece: one per piece character), so a text longer than a token limit times
    # this cannot fit the limit, whatever its tokens turn out to be.
    max_chars_per_token: int


@dataclass(frozen=True, slots=True)
class AdapterSummary:
    """What validating an adapter's files found: what a manifest records."""

    family: str
    units: dict[str, int]  # module -> rank (or entries), the largest over layers


class TextOps:
    """Tokenizing and chat templates, for a client that holds the model's tokenizer (`self.tokenizer`):
    the in-process client, and the Ray Serve ingress's remote one (server.ray_serve), which tokenizes
    before it sends token ids to an engine replica."""

    tokenizer: object
    limits: EngineLimits
    _grammars: guided.Grammars | None = None
    _compile_slots: asyncio.Semaphore | None = None

    # -- text ------------------------------------------------------------------------------------
    async def tokenize(self, text: str) -> list[int]:
        encode = self.tokenizer
        if len(text) > OFFLOAD_CHARS:
            return await asyncio.to_thread(lambda: encode(text)["input_ids"])
        return encode(text)["input_ids"]

    def detokenize(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    @property
    def token_strings(self) -> TokenStrings:
        """Token id -> its text and bytes, memoised (logprobs name their tokens)."""
        strings = getattr(self, "_token_strings", None)
        if strings is None:
            strings = self._token_strings = TokenStrings(self.tokenizer)
        return strings

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.chat_template)

    @property
    def chat_template_uses_tools(self) -> bool:
        """Whether the chat template renders a `tools` argument (tool calling needs one that does)."""
        return _template_uses_tools(self.tokenizer.chat_template)

    async def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The prompt tokens of a conversation under the model's chat template, with the tools it may call
        (InvalidRequest if the template refuses it, e.g. "roles must alternate")."""
        tok = self.tokenizer
        extra = {"tools": tools} if tools else {}

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
            except TemplateError as e:
                raise InvalidRequest(f"the model's chat template refuses these messages: {e.message or 'template error'}", param="messages") from None
            return tok(text, add_special_tokens=False)["input_ids"]

        chars = sum(len(m["content"]) for m in messages) + TEMPLATE_CHARS_PER_MESSAGE * len(messages)
        return await asyncio.to_thread(render) if chars > OFFLOAD_CHARS or tools or len(messages) > 64 else render()

    # -- structured output -----------------------------------------------------------------------
    @property
    def grammars(self) -> guided.Grammars:
        """Grammars for this tokenizer over the model's logits width (server.engine.guided)."""
        if self._grammars is None:
            eos = self.tokenizer.eos_token_id
            self._grammars = guided.Grammars(self.tokenizer, self.limits.vocab_size, [] if eos is None else [eos])
        return self._grammars

    async def compile_guided(self, spec: guided.GuidedSpec):
        """The spec's compiled grammar, compiled on a worker thread (GuidedError: too large, malformed,
        unsupported, or slower than COMPILE_TIMEOUT_S). At most MAX_COMPILES run at once: a compile cannot be
        interrupted, so one that overruns keeps its slot until it ends and hostile schemas cannot pile up."""
        grammars = self.grammars
        if (hit := grammars.cached(spec)) is not None:
            return hit
        guided.check_spec(spec)  # the limits before any wait or thread
        if self._compile_slots is None:
            self._compile_slots = asyncio.Semaphore(MAX_COMPILES)
        slots, loop = self._compile_slots, asyncio.get_running_loop()
        deadline = loop.time() + guided.COMPILE_TIMEOUT_S
        try:
            await asyncio.wait_for(slots.acquire(), guided.COMPILE_TIMEOUT_S)
            work = loop.run_in_executor(None, grammars.compile, spec)
            work.add_done_callback(lambda _: slots.release())
            return await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise guided.GuidedError(f"the grammar did not compile within {guided.COMPILE_TIMEOUT_S:g} s: simplify it") from None


# Grammars compiled at once (server.engine.guided), each on a worker thread of its own.
MAX_COMPILES = 2


def _template_uses_tools(template) -> bool:
    if isinstance(template, dict):  # several named templates: any of them
        return any(_template_uses_tools(t) for t in template.values())
    return isinstance(template, str) and _source_uses_tools(template)


@functools.lru_cache(maxsize=8)
def _source_uses_tools(template: str) -> bool:
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except jinja2.TemplateError:
        return False


class EngineClient(TextOps):
    def __init__(self, engine: LLMEngine, on_step=None):
        self._engine = engine
        self._async = AsyncEngine(engine, on_step=on_step)
        tok = engine.tokenizer
        blocks = engine.block_manager
        self.limits = EngineLimits(
            max_model_len=engine.max_model_len, max_num_seqs=engine.config.max_num_seqs,
            kv_cache_tokens=blocks.num_blocks * blocks.block_size, vocab_size=engine.model.config.vocab_size,
            max_lora_rank=engine.config.max_lora_rank,
            max_chars_per_token=max(len(t) for t in tok.get_vocab()),
        )  # fmt: skip

    # -- lifetime and description ----------------------------------------------------------------
    def start(self) -> None:
        self._async.start()

    def stop(self) -> None:
        self._async.stop()

    @property
    def healthy(self) -> bool:
        return self._async.healthy

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def grammars(self):
        """The engine's own grammars: one tokenizer index, one cache, for the API and the engine."""
        return self._engine.grammars

    @property
    def model_dir(self) -> Path:
        return self._engine.model_dir

    @property
    def static_adapters(self) -> frozenset[str]:
        """Adapters loaded with the server (--adapter, --adapters-dir): usable by every caller."""
        return frozenset(self._engine.static_adapters)

    @property
    def model_config(self) -> ModelConfig:
        """The base model's shapes (what adapters must fit)."""
        return self._engine.model.config

    @property
    def base_fingerprint(self) -> str:
        """Adapters made for another base model are refused: this names the one served."""
        return self._engine.base_fingerprint

    def describe(self) -> dict:
        """What the server runs on, for the admin's /health."""
        e = self._engine
        return {"model": e.model_name, "device": str(e.device), "dtype": e.dtype_name, "lora_dtype": e.lora_dtype_name, "adapters_resident": len(e.adapters.resident),
                "quantization": e.quantization, "kernels": e.kernels, "scheduling": e.config.scheduling,
                "prefix_caching": e.block_manager.enable_prefix_caching,
                "decode_fast_path": "off (eager)" if e.runner.graphs is None else e.runner.graphs.describe()}  # fmt: skip

    def observe(self, metrics) -> None:
        """Refresh the engine's gauges in `metrics` (server.metrics.Metrics)."""
        metrics.observe_engine(self._engine)

    # -- requests --------------------------------------------------------------------------------
    def generate(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """The sequence's outputs as they come; RequestFailed if it fails. Leaving early aborts it."""
        return self._async.generate(seq)

    @property
    def sequences_in_flight(self) -> int:
        """Sequences submitted whose outputs are still coming (one per choice of a request)."""
        return self._async.sequences_in_flight

    def fail_all(self, error: RequestFailed, refuse_new: bool = False) -> None:
        """Fail every sequence in the engine with `error`, between steps; with refuse_new, every one
        submitted later too (a shutdown). Returns at once; a signal handler may call it."""
        self._async.fail_all(error, refuse_new)

    # -- adapters --------------------------------------------------------------------------------
    def parse_adapter(self, files: dict[str, bytes], name: str, family: str | None = None):
        """The adapter's weights for this model (InvalidAdapter if the files are malformed or do not fit)."""
        return self._engine.parse_adapter(files, name, family)

    async def validate_adapter(self, files: dict[str, bytes], name: str, family: str | None = None) -> AdapterSummary:
        weights = await asyncio.to_thread(self.parse_adapter, files, name, family)
        return AdapterSummary(weights.family, weights.module_units())

    @staticmethod
    def is_per_user(family: str) -> bool:
        """Whether adapters of this family are made per user (and so have per-user state, and no pin)."""
        found = FAMILIES.get(family)
        return found is not None and found.per_user

    async def residency(self, key: str) -> tuple[bool, bool]:
        """(on the device, pinned) of an adapter by its engine key."""

        def look(engine: LLMEngine) -> tuple[bool, bool]:
            entry = engine.adapters.get(key)
            return entry is not None, entry is not None and entry.pinned

        return await self._async.call(look)

    async def pin(self, key: str, weights, family: str) -> None:
        """Place the adapter on the device and keep it there (AdapterTooLarge: never fits; NoRoom: not now)."""
        if self.is_per_user(family):
            raise NotPinnable(f"{family} adapters are made per user on demand: there is no one device copy to pin")

        def place(engine: LLMEngine) -> None:
            if engine.adapters.ensure_resident(weights) is None:
                raise NoRoom("the adapter does not fit in the adapter memory next to the adapters in use; retry later")
            engine.adapters.set_pinned(key, True)

        await self._async.call(place)

    async def unpin(self, key: str) -> None:
        await self._async.call(lambda engine: engine.adapters.set_pinned(key, False))

    async def evict(self, key: str) -> None:
        """Unpin and drop the adapter from the device; requests using it finish first (the pools let go of it then)."""
        await self._async.call(lambda engine: engine.adapters.set_pinned(key, False) or engine.adapters.remove(key))

    async def evict_adapter(self, prefix: str) -> None:
        """evict every resident key that starts with `prefix` (server.adapters.service.keys_prefix)."""

        def evict_all(engine) -> None:
            for key in [k for k in engine.adapters.resident if k.startswith(prefix)]:
                engine.adapters.set_pinned(key, False)
                engine.adapters.remove(key)

        await self._async.call(evict_all)
