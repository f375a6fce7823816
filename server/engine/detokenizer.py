"""Incremental detokenization with stop strings, held back until they can no longer match."""
from __future__ import annotations


class IncrementalDetokenizer:
    # A few prompt tokens give the decoder the context it needs for leading spaces (SentencePiece).
    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-self.CONTEXT_TOKENS :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string ended the text."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for more bytes
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(0, len(self.text) - self.holdback)
        self.text += delta
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos != -1:
                self.text = self.text[:pos]
                return True
        return False

    def take(self, finished: bool) -> str:
        """Text not yet handed out; the tail that may still become a stop string waits unless finished."""
        end = len(self.text) if finished or not self.stop else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
