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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
