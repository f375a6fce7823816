"""Fitted SG-LoRA generators (admin): `POST /admin/v1/generators:fit`, list, show, delete.

`POST /admin/v1/generators:fit` {"tenant", "name": "cvae", "experts": ["tenant/name", ...] | null,
"epochs": 2000, "seed": 0, "basis_rank": 32, "rank": null, "latent_dim": 8, "new_version": false}
fits a conditional VAE over the tenant's expert LoRAs (server/adapters/generators.py) and answers
201 with the stored artifact's manifest; `"generator": "cvae"` in `POST /admin/v1/adapters:generate`
then samples it. This route only reads the request.
"""
from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from server.adapters.generators import (
    DEFAULT_NAME,
    MAX_BASIS_RANK,
    MAX_EPOCHS,
    MAX_EXPERTS,
    MAX_LATENT_DIM,
    MIN_EXPERTS,
    FitRequest,
    delete_generator,
    fit_generator,
    get_generator,
    list_generators,
)
from server.api.admin.generate import text_encoder
from server.api.admin.routes import _admin
from server.validation import StrictModel, Text

router = APIRouter(prefix="/admin/v1")


class FitBody(StrictModel):
    tenant: Annotated[Text, Field(max_length=256)]
    name: Annotated[Text, Field(max_length=256)] = DEFAULT_NAME
    experts: list[Annotated[Text, Field(max_length=512)]] | None = Field(default=None, min_length=MIN_EXPERTS, max_length=MAX_EXPERTS)
    epochs: int = Field(default=2000, ge=1, le=MAX_EPOCHS)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    basis_rank: int = Field(default=32, ge=1, le=MAX_BASIS_RANK)
    rank: int | None = Field(default=None, ge=1, le=MAX_BASIS_RANK)
    latent_dim: int = Field(default=8, ge=1, le=MAX_LATENT_DIM)
    new_version: bool = False


def _json(m) -> dict:
    return dataclasses.asdict(m)


@router.post("/generators:fit", status_code=201)
async def fit(body: FitBody, request: Request):
    state = _admin(request)
    manifest = await fit_generator(state.adapter_service, state.engine, text_encoder(state), FitRequest(**body.model_dump()))
    return JSONResponse(_json(manifest), status_code=201)


@router.get("/generators")
async def list_all(request: Request, tenant: str | None = None):
    state = _admin(request)
    return {"data": [_json(m) for m in await list_generators(state.adapter_service, tenant)]}


@router.get("/generators/{tenant}/{name}")
async def show(tenant: str, name: str, request: Request):
    state = _admin(request)
    return _json(await get_generator(state.adapter_service, tenant, name))


@router.delete("/generators/{tenant}/{name}")
async def delete(tenant: str, name: str, request: Request):
    state = _admin(request)
    versions = await delete_generator(state.adapter_service, tenant, name)
    return {"deleted": f"{tenant}/{name}", "versions": versions}
