"""Structured output (guided decoding): grammars compiled by xgrammar, one matcher per sequence, and the
token mask that keeps each constrained row of a batch inside its grammar.

Semantics, per guided row r of a step:  logits[r, v] = -inf  for every token v its grammar forbids next;
rows without a grammar are untouched, so constrained and free requests share one batch and one forward.

- `GuidedSpec` is what a request asks for (a JSON schema, any JSON object, a regex, a choice of strings,
  an EBNF grammar): small, hashable and picklable. It travels inside SamplingParams, also to Ray Serve
  replicas (server.ray_serve.wire), which compile it on their side: no compiled grammar and no matcher
  state is ever pickled.
- `Grammars` compiles specs for one tokenizer (xgrammar's TokenizerInfo over the model's logits width),
  under limits checked before any work (`check_spec`), and caches compiled grammars by spec.
- `GrammarState` is a sequence's own matcher. The engine advances it with each token the sequence keeps
  (server.engine.llm_engine) and a matcher that reached its end stops the sequence (finish_reason "stop").
- `mask_logits` fills a bitmask for the guided rows only (the per-step CPU cost is theirs alone) and
  applies it in one op.

Speculative decoding: guided sequences get no n-gram drafts (server.engine.llm_engine.make_speculator).
Checking a draft against the matcher would need a rollback per rejected token; without drafts a guided
sequence samples exactly one token per step and its matcher only ever moves forward.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from server.errors import InvalidRequest

# Limits a request's spec is held to before anything is compiled: a hostile schema must not stall the server.
MAX_SPEC_BYTES = 32 * 1024  # the schema / regex / grammar text, or all choices together
MAX_NESTING = 24  # JSON nesting depth of a schema document
MAX_CHOICES = 256
# properties of one schema object: xgrammar's compile time grows about quadratically with optional ones
# (256: 0.3 s, 1,000: 5 s on this box's cores)
MAX_PROPERTIES = 256
COMPILE_TIMEOUT_S = 10.0  # the API waits this long for a compile (server.engine.client.TextOps.compile_guided)
CACHE_SIZE = 64  # compiled grammars kept per tokenizer

KINDS = ("json", "json_object", "regex", "choice", "grammar")
GUIDED_REJECTED = "the sampled token does not fit the request's grammar (structured output): the grammar state is lost"


class GuidedError(InvalidRequest):
    """A spec that is too large, malformed or unsupported: the request's own fault (a 400), with the reason."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param=param, code="invalid_structured_output")


@dataclass(frozen=True, slots=True)
class GuidedSpec:
    """A request's output constraint. `value` is the schema as canonical JSON text ("json"), the regex
    ("regex"), the EBNF grammar ("grammar"), a JSON array of the strings ("choice"), or "" ("json_object")."""

    kind: str
    value: str = ""
    any_whitespace: bool = True  # JSON: any whitespace between tokens (vLLM's disable_any_whitespace turns it off)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"guided kind {self.kind!r}: one of {KINDS}")

    @classmethod
    def json_schema(cls, schema: dict | bool, any_whitespace: bool = True) -> "GuidedSpec":
        """A schema as parsed JSON, as compact text (key order kept: it is the order properties are generated in)."""
        return cls("json", _dumps(schema), any_whitespace)

    @classmethod
    def choice(cls, choices: list[str]) -> "GuidedSpec":
        return cls("choice", json.dumps(list(choices), ensure_ascii=False))


def _dumps(value) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, RecursionError):  # a circular or absurdly deep structure (never from parsed JSON)
        raise GuidedError("the schema cannot be serialised as JSON") from None


def check_spec(spec: GuidedSpec) -> None:
    """Refuse a spec too large or too deep to compile, before any compile work (GuidedError)."""
    size = len(spec.value.encode())
    if size > MAX_SPEC_BYTES:
        raise GuidedError(f"the {_what(spec)} is {size} bytes; this server compiles at most {MAX_SPEC_BYTES}")
    if spec.kind == "json":
        try:
            schema = json.loads(spec.value)
        except (ValueError, RecursionError):
            raise GuidedError("the JSON schema is not valid JSON") from None
        if not isinstance(schema, dict | bool):
            raise GuidedError("a JSON schema is an object (or true / false)")
        depth = _depth(schema)
        if depth > MAX_NESTING:
            raise GuidedError(f"the JSON schema nests {depth} levels deep; this server compiles at most {MAX_NESTING}")
    elif spec.kind == "choice":
        choices = json.loads(spec.value)
        if not choices:
            raise GuidedError("guided_choice needs at least one string")
        if len(choices) > MAX_CHOICES:
            raise GuidedError(f"guided_choice has {len(choices)} strings; this server takes at most {MAX_CHOICES}")
        if any(not isinstance(c, str) or not c for c in choices):
            raise GuidedError("guided_choice must list non-empty strings")
    elif spec.kind in ("regex", "grammar") and not spec.value:
        raise GuidedError(f"the {_what(spec)} is empty")


def _what(spec: GuidedSpec) -> str:
    return {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "list of choices", "grammar": "grammar"}[spec.kind]


def _depth(value) -> int:
    """Nesting depth of parsed JSON, iteratively (a recursive walk of hostile input could overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            if depth > MAX_NESTING:  # deep enough to refuse: no need to walk the rest
                return depth
            if isinstance(node, dict) and isinstance(props := node.get("properties"), dict) and len(props) > MAX_PROPERTIES:
                raise GuidedError(f"a JSON schema object has {len(props)} properties; this server compiles at most {MAX_PROPERTIES}")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")  # "[14:06:40] /project/cpp/x.cc:94: " before the reason


def _reason(error: Exception) -> str:
    """xgrammar's message without its C++ source location (which says nothing to a client)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_PREFIX.sub("", first)[:300]


class Grammars:
    """Compiles specs for one tokenizer and vocabulary width (the model's logits), with a small LRU cache.
    Thread-safe: the API compiles on worker threads while the engine thread builds matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None  # built on first use: the tokenizer's vocabulary takes ~0.1-1 s to index
        self._cache: OrderedDict[GuidedSpec, object] = OrderedDict()
        self._lock = threading.Lock()

    def _xgr_compiler(self):
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
                # one thread: the box is small, and a compile must not take every core from the engine
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def cached(self, spec: GuidedSpec):
        """The spec's compiled grammar if it is in the cache, else None."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        return None

    def compile(self, spec: GuidedSpec):
        """The spec's xgrammar CompiledGrammar (GuidedError if the spec is too large, malformed or unsupported).
        Slow for a large schema: call it on a worker thread (server.engine.client.TextOps.compile_guided)."""
        if (hit := self.cached(spec)) is not None:
            return hit
        check_spec(spec)
        compiler = self._xgr_compiler()
        try:
            if spec.kind == "json":
                compiled = compiler.compile_json_schema(spec.value, any_whitespace=spec.any_whitespace)
            elif spec.kind == "json_object":
                compiled = compiler.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.value)
            elif spec.kind == "choice":
                # JSON string literals are EBNF string literals in xgrammar (the same escapes)
                compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in json.loads(spec.value)))
            else:
                compiled = compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar reports every bad input as one of these
            raise GuidedError(f"the {_what(spec)} cannot be compiled: {_reason(e)}") from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def start(self, compiled) -> "GrammarState":
        """A fresh matcher over a compiled grammar, ending at this model's stop tokens."""
        return GrammarState(compiled, self.stop_token_ids)


class GrammarState:
    """One sequence's position in its grammar. Lives on the engine thread with its Sequence; never pickled."""

    __slots__ = ("matcher",)

    def __init__(self, compiled, stop_token_ids: list[int]):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)

    def accept(self, token: int) -> bool:
        """Advance by one kept token; False if the grammar forbids it (the state is then unchanged)."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing may follow."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row] (int32 words, bit v % 32 of word v // 32)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)


def mask_logits(logits: Tensor, rows: list[tuple[int, GrammarState]]) -> dict[int, str]:
    """logits (B, V) float32, in place: every row r listed gets -inf wherever its grammar forbids the next
    token; the other rows are untouched. Returns {row: why} for rows whose matcher failed (those rows are
    left unmasked, and the caller fails their sequences alone).

    The bitmask is filled on the host, one row per guided sequence, and applied on the logits' device in
    one op over the guided rows (a bit-unpacking masked_fill: the same on CPU and CUDA)."""
    if not rows:
        return {}
    B, V = logits.shape
    words = (V + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)  # (G, W): all allowed until filled
    failures: dict[int, str] = {}
    good: list[int] = []
    for j, (row, state) in enumerate(rows):
        try:
            state.fill(bitmask, j)
        except Exception as e:  # noqa: BLE001 - one matcher's failure belongs to its sequence, not the batch
            failures[row] = f"structured output failed for this request: {_reason(e)}"
            continue
        good.append(j)
    if not good:
        return failures
    if len(good) < len(rows):
        bitmask = bitmask[good]
    index = [rows[j][0] for j in good]
    apply_bitmask(logits, bitmask, index)
    return failures


def apply_bitmask(logits: Tensor, bitmask: Tensor, rows: list[int]) -> None:
    """Semantics: logits[rows[j], v] = -inf where bit (v % 32) of bitmask[j, v // 32] is 0, for v < V.
    logits (B, V) float on any device, bitmask (G, W) int32 on the host, rows: G distinct row indices."""
    V = logits.shape[-1]
    device = logits.device
    bits = bitmask.pin_memory() if device.type == "cuda" else bitmask
    bits = bits.to(device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :V]  # (G, W*32) -> (G, V)
    index = torch.tensor(rows, dtype=torch.int64)
    index = (index.pin_memory() if device.type == "cuda" else index).to(device, non_blocking=True)
    picked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))  # (G, V)
    logits.index_copy_(0, index, picked)


def mask_row_reference(logits_row: Tensor, state: GrammarState) -> Tensor:
    """The oracle of `mask_logits` for one row, in plain steps: the allowed set read bit by bit."""
    V = logits_row.shape[-1]
    bitmask = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    state.fill(bitmask, 0)
    words = bitmask[0].tolist()
    allowed = torch.tensor([(words[v // 32] >> (v % 32)) & 1 == 1 for v in range(V)])
    return logits_row.masked_fill(~allowed.to(logits_row.device), float("-inf"))
