"""Strict validation shared by the API's request bodies and the adapter configs' schemas.

Requests are validated at the edge as OpenAI's own API does: no type coercion (a string `max_tokens`
is a 400), finite numbers only, and no text that is not valid Unicode (a lone surrogate such as
"\\ud800" cannot be encoded, tokenized or stored).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class StrictModel(BaseModel):
    # Unknown fields are ignored like OpenAI's own server does for forward compatibility.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
