"""The calibration text of quantization modes that learn activation ranges (w8a8's SmoothQuant).

A slice of Shakespeare (public domain, the char-rnn tinyshakespeare corpus) shipped with the package,
so a server calibrates offline and the same way every time. Its paragraphs are laid out as a dialogue
in the model's chat template when it has one: the template's special tokens carry activations plain
text never shows, and a chat request's first token depends on them (with plain text, the embedded
model's greedy answer to "What is the capital of France?" flips on its first token).
"""
from __future__ import annotations

from pathlib import Path

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
CALIBRATION_TOKENS = 512


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS) -> list[int]:
    text = CALIBRATION_TEXT.read_text()
    if getattr(tokenizer, "chat_template", None):
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        turns = [{"role": ("user", "assistant")[i % 2], "content": p} for i, p in enumerate(paragraphs[:16])]
        text = tokenizer.apply_chat_template(turns, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][:n]
    return tokenizer(text)["input_ids"][:n]
