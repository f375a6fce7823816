"""SG-LoRA generation as a service: an adapter generated from a task description, published in the registry.

Two generators. `fusion` chooses experts per request: by default every LoRA adapter the tenant may
use (its own and public ones) that has a description and the server's base model, leaving out
adapters that were themselves generated. `cvae` samples a fitted generator instead (a registry
artifact, see server/adapters/generators.py), named by `generator_ref` (default <tenant>/cvae).
The result is an ordinary `family="lora"` adapter whose provenance records how it was made
(server/families/sglora.py, sglora_cvae.py). Embedding, generating and validating run in worker
threads: this is admin work, off the serving path. Failures are domain errors (server.errors).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from adapters_store import AdapterExists, AdapterManifest, AdapterNotFound, InvalidName, validate_name
from server.adapters.service import AdapterService
from server.errors import InvalidRequest, ModelNotFound, Unavailable
from server.families.sglora import GenerationError, RankOverflow, description_sha256, is_generated, make_generator, provenance, select_experts
from server.families.text_encoder import EncoderUnavailable, default_encoder

__all__ = ["GenerationRequest", "generate_adapter", "default_encoder"]  # default_encoder: the routes' default
from server.lora.peft import parse_peft_lora

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    tenant: str
    name: str
    description: str
    experts: list[str] | None  # "tenant/name" or a name of the tenant's own; None: every eligible adapter
    top_k: int
    seed: int
    generator: str
    public: bool
    new_version: bool
    generator_ref: str | None = None  # cvae: "name" | "tenant/name", optionally "@vN"; None: <tenant>/cvae


async def generate_adapter(service: AdapterService, engine, encoder, req: GenerationRequest) -> AdapterManifest:
    """Generate, validate and publish; `engine` is the EngineClient, `encoder` the description encoder."""
    try:
        validate_name(req.tenant, "tenant name")
        validate_name(req.name, "adapter name")
    except InvalidName as e:
        raise InvalidRequest(str(e), param="name") from None
    if not req.description.strip():
        raise InvalidRequest("the description is empty: describe the task the adapter is for", param="description")
    registry = service.registry
    await registry.get_tenant(req.tenant)  # TenantNotFound (404) before any work
    existing = await registry.versions(req.tenant, req.name)
    if existing and not req.new_version:
        raise AdapterExists(f"adapter {req.tenant}/{req.name} already exists (v{existing[-1]}); pass new_version=true or delete it first")
    if req.generator == "cvae":
        return await _generate_cvae(service, engine, encoder, req)
    if req.generator_ref is not None:
        raise InvalidRequest("generator_ref names a fitted generator: it applies to generator \"cvae\" only", param="generator_ref")
    limits = engine.limits
    try:
        generator = make_generator(req.generator, max_rank=limits.max_lora_rank, num_layers=engine.model_config.num_layers)
    except GenerationError as e:
        raise InvalidRequest(str(e), param="generator") from None

    candidates = await (_named_experts(service, req.tenant, req.experts) if req.experts else _default_experts(service, req.tenant))
    if not candidates:
        raise InvalidRequest(f"no expert adapters to generate from: tenant {req.tenant} can use no LoRA adapter with a description "
                             "for this base model", code="no_experts")  # fmt: skip
    try:
        chosen = await asyncio.to_thread(select_experts, encoder, req.description, candidates, req.top_k)
    except EncoderUnavailable as e:
        raise Unavailable(f"the description encoder is unavailable: {e}", code="encoder_unavailable") from None
    try:
        files_list = await asyncio.gather(*(registry.fetch_files(e.manifest, cache=service.disk) for e in chosen))
    except AdapterNotFound as e:  # deleted meanwhile
        raise ModelNotFound(str(e), param="experts") from None

    def build() -> tuple[dict[str, bytes], object]:
        experts = [
            # float32 whatever the serving dtype: the fusion is exact on the stored weights
            (e.manifest, parse_peft_lora(files, e.ref, engine.model_config, torch.float32, max(limits.max_lora_rank, 1 << 16)))
            for e, files in zip(chosen, files_list)
        ]
        files = generator.generate(experts, [e.weight for e in chosen], req.seed)
        return files, engine.parse_adapter(files, f"{req.tenant}/{req.name}", "lora")

    try:
        files, weights = await asyncio.to_thread(build)
    except RankOverflow as e:
        raise InvalidRequest(str(e), param="top_k", code="rank_overflow") from None
    except GenerationError as e:
        raise InvalidRequest(str(e), code="generation_failed") from None

    ranks = weights.module_units()
    record = provenance(generator, req.description, req.seed, chosen, encoder.name, req.top_k, len(candidates))
    manifest = await registry.publish(
        req.tenant, req.name, files, family="lora", base_model=service.base_model, ranks=ranks, target_modules=sorted(ranks),
        description=req.description, public=req.public, provenance=record, new_version=req.new_version,
    )  # fmt: skip
    service.forget(req.tenant, req.name)
    log.info("generated %s from %s", manifest.ref, ", ".join(f"{e.ref}@v{e.manifest.version} ({e.weight:.3f})" for e in chosen))
    return manifest


async def _generate_cvae(service: AdapterService, engine, encoder, req: GenerationRequest) -> AdapterManifest:
    """Sample the fitted generator for the description's embedding, validate, publish."""
    from server.adapters.generators import generator_provenance, load_generator  # it imports this module
    from server.families.sglora_cvae import one_torch_thread

    if req.experts:
        raise InvalidRequest("the cvae generator was fitted on its experts: name them when fitting (POST /admin/v1/generators:fit), not here",
                             param="experts")  # fmt: skip
    art, generator = await load_generator(service, engine, req.tenant, req.generator_ref)
    if generator.meta.get("base_model") != service.base_model:
        raise InvalidRequest(f"generator {art.tenant}/{art.name} was fitted for base model {generator.meta.get('base_model')}, "
                             f"this server serves {service.base_model}: fit it again here", param="generator_ref")  # fmt: skip
    if generator.meta.get("encoder") != encoder.name:
        raise InvalidRequest(f"generator {art.tenant}/{art.name} was fitted with the encoder {generator.meta.get('encoder')}, "
                             f"this server embeds with {encoder.name}: fit it again here", param="generator_ref")  # fmt: skip
    limits = engine.limits

    def build() -> tuple[dict[str, bytes], object]:
        with one_torch_thread():  # small ops: one thread is faster on a busy CPU, and machine-independent
            embedding = encoder.encode([req.description])[0]
            files = generator.generate(embedding, req.seed, max_rank=limits.max_lora_rank)
            return files, engine.parse_adapter(files, f"{req.tenant}/{req.name}", "lora")

    try:
        files, weights = await asyncio.to_thread(build)
    except EncoderUnavailable as e:
        raise Unavailable(f"the description encoder is unavailable: {e}", code="encoder_unavailable") from None
    except RankOverflow as e:
        raise InvalidRequest(str(e), param="generator_ref", code="rank_overflow") from None
    except GenerationError as e:
        raise InvalidRequest(str(e), code="generation_failed") from None

    ranks = weights.module_units()
    record = generator_provenance(art, generator, description_sha256(req.description), req.seed, encoder.name)
    manifest = await service.registry.publish(
        req.tenant, req.name, files, family="lora", base_model=service.base_model, ranks=ranks, target_modules=sorted(ranks),
        description=req.description, public=req.public, provenance=record, new_version=req.new_version,
    )  # fmt: skip
    service.forget(req.tenant, req.name)
    log.info("generated %s with %s (seed %d)", manifest.ref, art.ref, req.seed)
    return manifest


def _not_found(ref: str) -> ModelNotFound:
    return ModelNotFound(f"expert adapter `{ref}` does not exist", param="experts")


async def _named_experts(service: AdapterService, tenant: str, refs: list[str]) -> list[AdapterManifest]:
    """The manifests of explicitly named experts; hidden ones answer exactly like missing ones."""
    out, seen = [], set()
    for ref in refs:
        owner, sep, name = ref.partition("/")
        if not sep:
            owner, name = tenant, ref
        if (owner, name) in seen:
            continue
        seen.add((owner, name))
        try:
            m = await service.manifest(owner, name, fresh=True)
        except (AdapterNotFound, InvalidName):
            raise _not_found(ref) from None
        if not (m.tenant == tenant or m.public):
            raise _not_found(ref)
        if m.family != "lora":
            raise InvalidRequest(f"expert `{ref}` is a {m.family} adapter; only LoRA adapters can be fused", param="experts")
        if m.base_model != service.base_model:
            raise InvalidRequest(f"expert `{ref}` was made for base model {m.base_model}, this server serves {service.base_model}", param="experts")
        if not m.description.strip():
            raise InvalidRequest(f"expert `{ref}` has no description to compare the task with", param="experts")
        out.append(m)
    return out


async def _default_experts(service: AdapterService, tenant: str) -> list[AdapterManifest]:
    return [
        m for m in await service.registry.list()
        if (m.tenant == tenant or m.public) and m.family == "lora" and m.base_model == service.base_model
        and m.description.strip() and not is_generated(m)
    ]  # fmt: skip
