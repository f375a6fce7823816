"""`POST /admin/v1/adapters:generate`: an SG-LoRA adapter generated from a task description.

Body: {"tenant", "name", "description", "experts": ["tenant/name", ...] | null, "top_k": 3, "seed": 0,
"generator": "fusion", "public": false, "new_version": false}; with "generator": "cvae", a fitted
generator is sampled instead: "generator_ref": "name" | "tenant/name" (optionally "@vN"; default
"<tenant>/cvae"), and `experts` / `top_k` do not apply (refused when given). The work is the
generation service's (server/adapters/generation.py); this route only reads the request.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from server.adapters.generation import GenerationRequest, default_encoder, generate_adapter
from server.api.admin.routes import _admin, _manifest_json
from server.validation import StrictModel, Text

router = APIRouter(prefix="/admin/v1")

MAX_TOP_K = 16


class GenerateRequest(StrictModel):
    tenant: Annotated[Text, Field(max_length=256)]
    name: Annotated[Text, Field(max_length=256)]
    description: Annotated[Text, Field(min_length=1, max_length=8192)]
    experts: list[Annotated[Text, Field(max_length=512)]] | None = Field(default=None, min_length=1, max_length=64)
    top_k: int = Field(default=3, ge=1, le=MAX_TOP_K)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    generator: Annotated[Text, Field(max_length=64)] = "fusion"
    generator_ref: Annotated[Text, Field(min_length=1, max_length=200)] | None = None
    public: bool = False
    new_version: bool = False

    @model_validator(mode="after")
    def _fields_of_the_generator(self):
        given = self.model_fields_set
        if self.generator == "cvae":
            wrong = sorted({"experts", "top_k"} & given)
            if wrong:
                raise ValueError(f"{', '.join(wrong)} apply to the fusion generator; the cvae generator samples its fitted artifact (generator_ref)")
        elif "generator_ref" in given and self.generator_ref is not None:
            raise ValueError('generator_ref names a fitted generator: it applies to "generator": "cvae" only')
        return self


def text_encoder(state):
    """The app's encoder when one was injected (`app.state.text_encoder`), else the process-wide one."""
    return getattr(state, "text_encoder", None) or default_encoder()


@router.post("/adapters:generate", status_code=201)
async def generate(body: GenerateRequest, request: Request):
    state = _admin(request)
    spec = GenerationRequest(**body.model_dump())
    manifest = await generate_adapter(state.adapter_service, state.engine, text_encoder(state), spec)
    return JSONResponse(_manifest_json(manifest), status_code=201)
