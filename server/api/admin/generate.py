"""`POST /admin/v1/adapters:generate`: an SG-LoRA adapter generated from a task description.

Body: {"tenant", "name", "description", "experts": ["tenant/name", ...] | null, "top_k": 3, "seed": 0,
"generator": "fusion", "public": false, "new_version": false}. Experts default to every LoRA adapter
the tenant may use (its own and public ones) that has a description and the server's base model,
leaving out adapters that were themselves generated. The result is published as an ordinary
`family="lora"` adapter whose provenance records how it was made (see server/families/sglora.py).
Embedding, fusing and validating run in worker threads: this is admin work, off the serving path.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from adapters_store import AdapterNotFound, CorruptObject, InvalidName, validate_name
from server.api.admin.routes import _admin, _manifest_json, _store
from server.api.errors import APIError, unavailable
from server.validation import StrictModel, Text
from server.families.sglora import GenerationError, RankOverflow, is_generated, make_generator, provenance, select_experts
from server.families.text_encoder import EncoderUnavailable, default_encoder
from server.lora.peft import AdapterError, parse_peft_lora

log = logging.getLogger(__name__)

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
    public: bool = False
    new_version: bool = False


def text_encoder(state):
    """The app's encoder when one was injected (`app.state.text_encoder`), else the process-wide one."""
    return getattr(state, "text_encoder", None) or default_encoder()


def _not_found(ref: str) -> APIError:
    return APIError(404, f"expert adapter `{ref}` does not exist", type="not_found_error", param="experts", code="not_found")


async def _named_experts(state, tenant: str, refs: list[str]):
    """The manifests of explicitly named experts; hidden ones answer exactly like missing ones."""
    service, out, seen = state.adapter_service, [], set()
    for ref in refs:
        owner, sep, name = ref.partition("/")
        if not sep:
            owner, name = tenant, ref
        if (owner, name) in seen:
            continue
        seen.add((owner, name))
        try:
            m = await _store(service.manifest(owner, name, fresh=True))
        except APIError as e:
            raise _not_found(ref) if e.status in (400, 404) else e from None
        if not (m.tenant == tenant or m.public):
            raise _not_found(ref)
        if m.family != "lora":
            raise APIError(400, f"expert `{ref}` is a {m.family} adapter; only LoRA adapters can be fused", param="experts")
        if m.base_model != service.base_model:
            raise APIError(400, f"expert `{ref}` was made for base model {m.base_model}, this server serves {service.base_model}", param="experts")
        if not m.description.strip():
            raise APIError(400, f"expert `{ref}` has no description to compare the task with", param="experts")
        out.append(m)
    return out


async def _default_experts(state, tenant: str):
    service = state.adapter_service
    return [
        m for m in await _store(state.registry.list())
        if (m.tenant == tenant or m.public) and m.family == "lora" and m.base_model == service.base_model
        and m.description.strip() and not is_generated(m)
    ]  # fmt: skip


@router.post("/adapters:generate", status_code=201)
async def generate_adapter(body: GenerateRequest, request: Request):
    state = _admin(request)
    service, engine = state.adapter_service, state.engine.engine
    tenant, name = body.tenant, body.name
    try:
        validate_name(tenant, "tenant name")
        validate_name(name, "adapter name")
    except InvalidName as e:
        raise APIError(400, str(e), param="name") from None
    await _store(state.registry.get_tenant(tenant))  # 404 for an unknown tenant before any work
    existing = await _store(state.registry.versions(tenant, name))
    if existing and not body.new_version:
        raise APIError(409, f"adapter {tenant}/{name} already exists (v{existing[-1]}); pass new_version=true or delete it first", code="conflict")
    max_rank = engine.config.max_lora_rank
    try:
        generator = make_generator(body.generator, max_rank=max_rank, num_layers=engine.model.config.num_layers)
    except GenerationError as e:
        raise APIError(400, str(e), param="generator") from None

    candidates = await (_named_experts(state, tenant, body.experts) if body.experts else _default_experts(state, tenant))
    if not candidates:
        raise APIError(
            400, f"no expert adapters to generate from: tenant {tenant} can use no LoRA adapter with a description for this base model",
            code="no_experts",
        )
    encoder = text_encoder(state)
    try:
        chosen = await asyncio.to_thread(select_experts, encoder, body.description, candidates, body.top_k)
    except EncoderUnavailable as e:
        raise APIError(503, str(e), type="service_unavailable", code="encoder_unavailable") from None

    try:
        files_list = await asyncio.gather(*(_store(state.registry.fetch_files(e.manifest, cache=service.disk)) for e in chosen))
    except CorruptObject as e:
        raise unavailable(str(e), code="adapter_corrupt") from None
    except AdapterNotFound as e:  # deleted meanwhile
        raise APIError(404, str(e), type="not_found_error", code="not_found") from None

    def build() -> tuple[dict[str, bytes], object]:
        experts = [
            # float32 whatever the serving dtype: the fusion is exact on the stored weights
            (e.manifest, parse_peft_lora(files, e.ref, engine.model.config, torch.float32, max(max_rank, 1 << 16)))
            for e, files in zip(chosen, files_list)
        ]
        files = generator.generate(experts, [e.weight for e in chosen], body.seed)
        weights = engine.parse_adapter(files, f"{tenant}/{name}", "lora")
        return files, weights

    try:
        files, weights = await asyncio.to_thread(build)
    except RankOverflow as e:
        raise APIError(400, str(e), param="top_k", code="rank_overflow") from None
    except GenerationError as e:
        raise APIError(400, str(e), code="generation_failed") from None
    except AdapterError as e:
        raise APIError(400, str(e), code="invalid_adapter") from None

    ranks = weights.module_units()
    record = provenance(generator, body.description, body.seed, chosen, encoder.name, body.top_k, len(candidates))
    manifest = await _store(state.registry.publish(
        tenant, name, files, family="lora", base_model=service.base_model, ranks=ranks, target_modules=sorted(ranks),
        description=body.description, public=body.public, provenance=record, new_version=body.new_version,
    ))  # fmt: skip
    service.forget(tenant, name)
    log.info("generated %s from %s", manifest.ref, ", ".join(f"{e.ref}@v{e.manifest.version} ({e.weight:.3f})" for e in chosen))
    return JSONResponse(_manifest_json(manifest), status_code=201)
