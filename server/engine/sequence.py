"""A request as the engine sees it: token ids, sampling parameters and its place in the KV cache."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engine.guided import GrammarState, GuidedSpec
    from server.families.base import AdapterWeights


# Below this a temperature only divides logits towards overflow; 0 asks for greedy decoding.
MIN_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
MAX_LOGPROBS = 20  # most alternatives a token's logprobs list (vLLM's default --max-logprobs)
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)


class RequestFailed(Exception):
    """A failure that belongs to one request: its sequences end, every other request goes on.
    The message is meant for the client: it never carries internals. `status` is the HTTP status the
    API answers with: 500 for a failure in the engine, 4xx for one the request itself causes."""

    def __init__(self, message: str, status: int = 500, code: str = "request_failed"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Structured output (server.engine.guided): the grammar the output must follow. A small picklable spec,
    # compiled where the sequence runs (a Ray replica compiles its own), never the compiled grammar.
    guided: GuidedSpec | None = None
    # Logits processing (server.engine.logits_processors), vLLM's semantics: penalties of output tokens
    # (presence, frequency) and of prompt + output tokens (repetition), an additive bias per token id,
    # and EOS / stop_token_ids masked until min_tokens tokens were generated.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids distinct
    # Logprobs (server.engine.logprobs): None = none; k = the sampled token's and the k most likely
    # tokens' logprobs. prompt_logprobs: the same for every prompt token (from the first one's successor on).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # The API validates requests at the edge; these are the engine's own invariants, so that no
        # value can reach a step and fail the batch it runs in.
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be 0 (greedy) or a finite number of at least {MIN_TEMPERATURE}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must lie in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1 or 0 (disabled) or positive")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError("seed must fit in 64 bits")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must lie in [-2, 2]")
        if not 1e-6 <= self.repetition_penalty <= 1e6:  # float32 logits stay finite (the API's bounds too)
            raise ValueError("repetition_penalty must lie in [1e-6, 1e6]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must lie in [0, max_tokens]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError(f"logit_bias holds at most {MAX_LOGIT_BIAS} distinct token ids")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ValueError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must lie in [0, {MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the row's logits need its token counts (server.engine.logits_processors)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor changes this row's logits (rows that do not cost nothing)."""
        return self.penalized or self.min_tokens > 0 or bool(self.logit_bias)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position's logprobs: the token there, its logprob, and the `top` most likely tokens with
    theirs, most likely first (server.engine.logprobs says which distribution). Plain data: it crosses
    to Ray Serve's ingress inside RequestOutput."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None = base model; else the key of a resident or loadable adapter
    adapter_weights: AdapterWeights | None = None  # host-RAM weights to place on the device if the adapter is not resident
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: RequestFailed | None = None  # why it failed (finish_reason "error"), for the client
    num_computed_tokens: int = 0  # tokens whose keys/values are in the KV cache
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    holds_adapter: bool = False  # counted as a user of its adapter (so it cannot be evicted)
    # Who asks, for fair scheduling and per-tenant accounting: the caller's tenant (None: the admin or
    # an open-mode caller) and that tenant's share weight (server.engine.fairness).
    tenant: str | None = None
    tenant_weight: float = 1.0
    # What the adapter computes (content hash; RecLoRA: plus the user's state), keying the prefix cache
    # together with the tokens (server.engine.prefix_cache); unset (None or ""): the base model shares
    # blocks with the base model, an adapter's sequence shares none (the API always sets it).
    prefix_identity: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at (last) admission
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, memoised by the block manager
    block_hashes_identity: str | None = None  # the identity they were computed under
    num_published_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it was first admitted to the running batch (queue time)
    # Structured output: params.guided compiled off the engine thread by whoever built the sequence (the API,
    # a Ray replica; the engine compiles it on add otherwise), and the sequence's own matcher, made on add.
    grammar: object | None = None
    guided: GrammarState | None = None
    # Another choice of the same request and prompt (n > 1): this one is admitted once that one's prompt
    # is computed and takes its full prompt blocks instead of computing them (Scheduler._sibling_blocks).
    # In-process only: a Ray replica builds its sequences without it.
    prefill_parent: Sequence | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, with params.logprobs
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. (with params.prompt_logprobs)
    # The client reads outputs as they come (SSE); False: only the whole result is read, so a Ray replica
    # sends it in one piece instead of one message per token (server.ray_serve.batching).
    streamed: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason = SequenceStatus.FINISHED, reason

    def fail(self, error: RequestFailed) -> None:
        """End this sequence alone because of something that belongs to it (its adapter, its numbers)."""
        self.finish("error")
        self.error = error
