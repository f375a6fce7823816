"""Fitted SG-LoRA generators as a service: fit a `cvae` generator on the registry's expert adapters,
store it in the registry as an artifact (kind "generators"), load it back to generate adapters.

The model code is `server/families/sglora_cvae.py`; this module does the registry work around it
(choosing and fetching experts, embedding their descriptions, publishing, verifying, caching) and
turns every failure into a domain error (server.errors). Fitting runs in a worker thread, one fit
at a time per process; its size is bounded by the request's limits (experts, epochs, basis rank) and
by the experts' total bytes, so one call cannot run for hours.
"""
from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from adapters_store import AdapterNotFound, ArtifactExists, ArtifactManifest, ArtifactNotFound, CorruptObject, InvalidName, validate_name
from server.adapters.generation import _default_experts, _named_experts
from server.adapters.service import AdapterService
from server.errors import InvalidRequest, ModelNotFound, Unavailable
from server.families import sglora_cvae as cvae
from server.families.sglora import GENERATOR_PREFIX, GenerationError
from server.families.text_encoder import EncoderUnavailable
from server.lora.peft import parse_peft_lora

log = logging.getLogger(__name__)

KIND = "generators"
DEFAULT_NAME = "cvae"
MAX_EXPERTS, MIN_EXPERTS, MAX_EPOCHS = cvae.MAX_EXPERTS, cvae.MIN_EXPERTS, cvae.MAX_EPOCHS
MAX_BASIS_RANK, MAX_LATENT_DIM = cvae.MAX_BASIS_RANK, cvae.MAX_LATENT_DIM
MAX_FIT_INPUT_BYTES = 1 << 30  # the experts' files together
MAX_RANK_SUM = 2048  # Σ of the experts' ranks on one module: bounds the basis computation
_REF = re.compile(r"^(?:([a-z0-9][a-z0-9._-]{0,63})/)?([a-z0-9][a-z0-9._-]{0,63})(?:@v([0-9]{1,6}))?$")
_CACHE_SIZE = 4

_fit_running = threading.Lock()  # one fit at a time in this process (it holds a CPU core for seconds to minutes)
_loaded: OrderedDict[tuple[str, int], cvae.CvaeGenerator] = OrderedDict()  # (files sha256, num_layers) -> generator
_loaded_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class FitRequest:
    tenant: str
    name: str = DEFAULT_NAME
    experts: list[str] | None = None  # "tenant/name" or the tenant's own name; None: every eligible adapter
    epochs: int = 2000
    seed: int = 0
    basis_rank: int = 32
    rank: int | None = None
    latent_dim: int = 8
    new_version: bool = False


def _names(tenant: str, name: str) -> None:
    try:
        validate_name(tenant, "tenant name")
        validate_name(name, "generator name")
    except InvalidName as e:
        raise InvalidRequest(str(e), param="name") from None


async def fit_generator(service: AdapterService, engine, encoder, req: FitRequest) -> ArtifactManifest:
    """Fit a cvae generator on the tenant's experts and publish it as generators/<tenant>/<name>."""
    _names(req.tenant, req.name)
    registry = service.registry
    await registry.get_tenant(req.tenant)  # TenantNotFound (404) before any work
    existing = await registry.artifacts.versions(KIND, req.tenant, req.name)
    if existing and not req.new_version:
        raise ArtifactExists(f"generator {req.tenant}/{req.name} already exists (v{existing[-1]}); pass new_version=true or delete it first")
    options = cvae.FitOptions(epochs=req.epochs, seed=req.seed, basis_rank=req.basis_rank, rank=req.rank, latent_dim=req.latent_dim)
    try:
        options.check()
    except GenerationError as e:
        raise InvalidRequest(str(e)) from None
    if req.rank is not None and req.rank > engine.limits.max_lora_rank:
        raise InvalidRequest(f"rank {req.rank} is above this server's --max-lora-rank {engine.limits.max_lora_rank}", param="rank", code="rank_overflow")

    candidates = await (_named_experts(service, req.tenant, req.experts) if req.experts else _default_experts(service, req.tenant))
    candidates = sorted(candidates, key=lambda m: (m.tenant, m.name))
    if len(candidates) < MIN_EXPERTS:
        raise InvalidRequest(
            f"fitting a generator needs at least {MIN_EXPERTS} expert adapters; tenant {req.tenant} can use {len(candidates)} "
            "LoRA adapter(s) with a description for this base model", code="no_experts",
        )  # fmt: skip
    if len(candidates) > MAX_EXPERTS:
        raise InvalidRequest(f"{len(candidates)} eligible experts, more than {MAX_EXPERTS}: name up to {MAX_EXPERTS} of them in `experts`", param="experts", code="too_many_experts")
    total = sum(m.bytes for m in candidates)
    if total > MAX_FIT_INPUT_BYTES:
        raise InvalidRequest(f"the experts hold {total} bytes together, above {MAX_FIT_INPUT_BYTES}: fit on fewer or smaller experts", param="experts", code="experts_too_large")
    rank_sums: dict[str, int] = {}
    for m in candidates:
        for module, r in m.ranks.items():
            rank_sums[module] = rank_sums.get(module, 0) + r
    if rank_sums and max(rank_sums.values()) > MAX_RANK_SUM:
        raise InvalidRequest(f"the experts' ranks add up to {max(rank_sums.values())} on one module, above {MAX_RANK_SUM}: fit on fewer or lower-rank experts", param="experts", code="experts_too_large")
    if _fit_running.locked():
        raise Unavailable("another generator fit is running on this server: retry when it is done", retry_after=30, code="fit_in_progress")

    try:
        files_list = await asyncio.gather(*(registry.fetch_files(m, cache=service.disk) for m in candidates))
    except AdapterNotFound as e:  # deleted meanwhile
        raise ModelNotFound(str(e), param="experts") from None
    except CorruptObject as e:
        log.error("generator fit: %s", e)
        raise Unavailable("an expert adapter's stored files fail their check; re-publish it", code="adapter_corrupt") from None
    limits, model_config = engine.limits, engine.model_config

    def work() -> cvae.CvaeGenerator:
        if not _fit_running.acquire(blocking=False):
            raise Unavailable("another generator fit is running on this server: retry when it is done", retry_after=30, code="fit_in_progress")
        try:
            with cvae.one_torch_thread():
                experts = [
                    cvae.Expert(f"{m.tenant}/{m.name}", m.version, m.sha256, m.description,
                                parse_peft_lora(files, f"{m.tenant}/{m.name}", model_config, torch.float32, max(limits.max_lora_rank, 1 << 16)))
                    for m, files in zip(candidates, files_list)
                ]  # fmt: skip
                embeddings = encoder.encode([m.description for m in candidates])
                return cvae.fit(experts, embeddings, options, model_config=model_config, base_model=service.base_model, encoder_name=encoder.name)
        finally:
            _fit_running.release()

    try:
        generator = await asyncio.to_thread(work)
    except EncoderUnavailable as e:
        raise Unavailable(f"the description encoder is unavailable: {e}", code="encoder_unavailable") from None
    except GenerationError as e:
        raise InvalidRequest(str(e), code="fit_failed") from None
    files = generator.to_files()
    meta = generator.meta
    metadata = {
        "generator": f"{GENERATOR_PREFIX}{cvae.NAME}",
        "format": cvae.FORMAT,
        "base_model": service.base_model,
        "encoder": meta["encoder"],
        "rank": meta["rank"],
        "modules": len(meta["modules"]),
        "pca_components": meta["pca_components"],
        "condition_components": meta["condition_components"],
        "latent_dim": meta["latent_dim"],
        "fit": meta["fit"],
        "experts": meta["experts"],
    }
    manifest = await registry.artifacts.publish(KIND, req.tenant, req.name, files, format=cvae.FORMAT, metadata=metadata, new_version=req.new_version)
    log.info("fitted %s on %d experts in %.1f s (%d bytes, energy kept %.3f)", manifest.ref, len(candidates), meta["fit"]["seconds"],
             manifest.bytes, meta["fit"]["energy_captured"])  # fmt: skip
    return manifest


def parse_ref(tenant: str, ref: str | None) -> tuple[str, str, int | None]:
    """(tenant, name, version) of a generator reference: "name", "tenant/name", either with "@vN"; default <tenant>/cvae."""
    if ref is None:
        return tenant, DEFAULT_NAME, None
    m = _REF.match(ref)
    if not m:
        raise InvalidRequest(f"generator_ref {ref[:80]!r} must be NAME or TENANT/NAME, optionally @vN (lowercase names)", param="generator_ref")
    return m.group(1) or tenant, m.group(2), int(m.group(3)) if m.group(3) else None


async def load_generator(service: AdapterService, engine, tenant: str, ref: str | None) -> tuple[ArtifactManifest, cvae.CvaeGenerator]:
    """The tenant's fitted generator named by `ref`, verified and parsed (cached by content)."""
    owner, name, version = parse_ref(tenant, ref)
    shown = f"{owner}/{name}" + (f"@v{version}" if version else "")
    missing = ModelNotFound(
        f"generator `{shown}` does not exist: fit one with `hotswap sglora fit --tenant {tenant}` (POST /admin/v1/generators:fit)",
        param="generator_ref", code="generator_not_found",
    )  # fmt: skip
    if owner != tenant:  # another tenant's generator carries what its experts were: hidden like a missing one
        raise missing
    if version is not None and version < 1:
        raise missing
    try:
        manifest = await service.registry.artifacts.get(KIND, owner, name, version)
    except (ArtifactNotFound, InvalidName):
        raise missing from None
    if manifest.format != cvae.FORMAT:
        raise InvalidRequest(f"generator `{shown}` is a {manifest.format} artifact, not {cvae.FORMAT}", param="generator_ref")
    key = (manifest.sha256, engine.model_config.num_layers)
    with _loaded_lock:
        cached = _loaded.get(key)
        if cached is not None:
            _loaded.move_to_end(key)
            return manifest, cached
    try:
        files = await service.registry.artifacts.fetch_files(manifest, cache=service.disk)
    except CorruptObject as e:
        log.error("generator %s: %s", manifest.ref, e)
        raise Unavailable(f"generator `{shown}`'s stored files fail their sha256 check: fit it again", code="generator_corrupt") from None
    try:
        generator = await asyncio.to_thread(cvae.CvaeGenerator.from_files, files, engine.model_config)
    except cvae.ArtifactError as e:
        log.error("generator %s: %s", manifest.ref, e)
        raise Unavailable(f"generator `{shown}` cannot be used by this server ({e}): fit it again", code="generator_corrupt") from None
    with _loaded_lock:
        _loaded[key] = generator
        while len(_loaded) > _CACHE_SIZE:
            _loaded.popitem(last=False)
    return manifest, generator


def generator_provenance(manifest: ArtifactManifest, generator: cvae.CvaeGenerator, description_sha256: str, seed: int, encoder_name: str) -> dict:
    return {
        "generator": f"{GENERATOR_PREFIX}{cvae.NAME}",
        "generator_ref": f"{manifest.tenant}/{manifest.name}",
        "generator_version": manifest.version,
        "generator_sha256": manifest.sha256,
        "generator_format": manifest.format,
        "description_sha256": description_sha256,
        "seed": seed,
        "latent": "mode" if seed == 0 else "sampled",
        "encoder": encoder_name,
        "rank": generator.rank,
        "experts": [{"ref": e["ref"], "version": e["version"], "sha256": e["sha256"]} for e in generator.experts],
    }


async def delete_generator(service: AdapterService, tenant: str, name: str) -> int:
    _names(tenant, name)
    return await service.registry.artifacts.delete(KIND, tenant, name)


async def list_generators(service: AdapterService, tenant: str | None) -> list[ArtifactManifest]:
    if tenant is not None:
        try:
            validate_name(tenant, "tenant name")
        except InvalidName as e:
            raise InvalidRequest(str(e), param="tenant") from None
    return await service.registry.artifacts.list(KIND, tenant)


async def get_generator(service: AdapterService, tenant: str, name: str) -> ArtifactManifest:
    _names(tenant, name)
    try:
        return await service.registry.artifacts.get(KIND, tenant, name)
    except ArtifactNotFound:
        raise ModelNotFound(f"generator `{tenant}/{name}` does not exist", code="generator_not_found") from None
