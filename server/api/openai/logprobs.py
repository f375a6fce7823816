"""Logprobs in OpenAI's response shapes (and vLLM's choices where OpenAI leaves one open).

Completions (legacy): {"tokens": [str], "token_logprobs": [float | null], "top_logprobs": [{str: float} | null],
"text_offset": [int]}: each position's dict holds the token there and the `logprobs` most likely tokens
(up to logprobs + 1 entries, as OpenAI and vLLM give); an echoed prompt's first token has nulls (nothing
predicts it). text_offset counts characters of the token strings from the choice's text so far, as vLLM does.

Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}: the
`top_logprobs` most likely tokens, most likely first. `bytes` are the token's own bytes (a byte-level BPE
token can hold part of a UTF-8 character, whose text alone is U+FFFD).

Logprobs below -9999 (or not finite) are written as -9999.0, as vLLM does: JSON has no -inf.
"""
from __future__ import annotations

import math

from server.engine.client import TokenLogprob, TokenStrings

FLOOR = -9999.0


def _clamp(lp: float) -> float:
    return lp if math.isfinite(lp) and lp > FLOOR else FLOOR


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprob | None], k: int, strings: TokenStrings,
                        text_offset: int = 0) -> dict:
    """The legacy completions' logprobs object of `token_ids`, entries[i] their logprobs (None: none)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = strings.text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(entry.logprob))
        pairs = [(token_id, entry.logprob)] + [(t, lp) for t, lp in entry.top[:k] if t != token_id]
        top_logprobs.append({strings.text(t): _clamp(lp) for t, lp in pairs})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprob], k: int, strings: TokenStrings) -> dict:
    """The chat completions' logprobs object of `token_ids`."""

    def one(token_id: int, lp: float) -> dict:
        return {"token": strings.text(token_id), "logprob": _clamp(lp), "bytes": strings.bytes(token_id)}

    return {"content": [{**one(t, e.logprob), "top_logprobs": [one(a, lp) for a, lp in e.top[:k]]} for t, e in zip(token_ids, entries)]}


class ResponseLogprobs:
    """What one request's choices report beside their text: logprobs (k alternatives; None: none asked) and,
    for completions with echo, the prompt before the text (with its logprobs when asked). Choice c answers
    prompt c // n; its prompt logprobs come with the first choice of that prompt (the one that computed it)."""

    def __init__(self, strings: TokenStrings, chat: bool, k: int | None, n: int, prompts: list[list[int]], echo_texts: list[str] | None):
        self.strings, self.chat, self.k, self.n = strings, chat, k, n
        self.prompts, self.echo_texts = prompts, echo_texts
        self.prompt_logprobs: dict[int, list[TokenLogprob]] = {}  # prompt index -> its logprobs, once known

    def note_prompt(self, choice: int, prompt_logprobs: list[TokenLogprob] | None) -> None:
        if prompt_logprobs is not None and choice % self.n == 0:
            self.prompt_logprobs[choice // self.n] = prompt_logprobs

    def prefix(self, choice: int) -> str:
        """The echoed prompt text of the choice ("" without echo)."""
        return self.echo_texts[choice // self.n] if self.echo_texts is not None else ""

    def logprobs(self, choice: int, token_ids: list[int], entries: list[TokenLogprob] | None, first: bool, text_offset: int = 0) -> dict | None:
        """The choice's logprobs object for these tokens (its first ones: with the echoed prompt's)."""
        if self.k is None:
            return None
        entries = entries or []
        if self.chat:
            return chat_logprobs(token_ids, entries, self.k, self.strings)
        ids: list[int] = list(token_ids)
        all_entries: list[TokenLogprob | None] = list(entries)
        if first and self.echo_texts is not None:
            prompt = self.prompts[choice // self.n]
            known = self.prompt_logprobs.get(choice // self.n, [])
            ids = prompt + ids
            all_entries = [None] + list(known) + [None] * (len(prompt) - 1 - len(known)) + all_entries
        return completion_logprobs(ids, all_entries, self.k, self.strings, text_offset)
