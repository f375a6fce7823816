"""Publishing and deleting adapters: the one path behind the admin upload / delete routes and vLLM's
runtime /v1/load_lora_adapter and /v1/unload_lora_adapter (server.api.openai.lora_adapters).

Publishing validates the files with the engine (the family's parser: shapes, ranks, finite weights)
before anything is stored. Deleting removes every version from the registry and drops the adapter from
every cache tier: manifests, host RAM, the device pools (on every Ray replica, through the engine
client), and every multi-adapter stack made with it (server.adapters.stacking).
"""
from __future__ import annotations

from adapters_store import AdapterManifest
from server.adapters.service import keys_prefix
from server.adapters.stacking import drop_stacks
from server.engine.client import ADAPTER_FILES


async def publish_files(state, tenant: str, name: str, files: dict[str, bytes], *, family: str | None = None, description: str = "",
                        public: bool = False, new_version: bool = False, provenance: dict | None = None) -> AdapterManifest:  # fmt: skip
    """Validate `files` as an adapter for the served model and publish them as tenant/name."""
    found = await state.engine.validate_adapter(files, f"{tenant}/{name}", family)
    ranks = found.units
    manifest = await state.registry.publish(
        tenant, name, {k: files[k] for k in ADAPTER_FILES},
        family=found.family, base_model=state.adapter_service.base_model, ranks=ranks, target_modules=sorted(ranks),
        description=description, public=public, new_version=new_version, provenance=provenance,
    )  # fmt: skip
    state.adapter_service.forget(tenant, name)
    return manifest


async def delete_everywhere(state, tenant: str, name: str) -> int:
    """Delete every version of tenant/name (AdapterNotFound first if there is none); the number deleted."""
    service = state.adapter_service
    await service.manifest(tenant, name, fresh=True)  # 404 before anything is deleted
    versions = await state.registry.delete_adapter(tenant, name)
    service.forget(tenant, name)
    # Every version and every user-state copy goes: a name uploaded again restarts at v1, whose key
    # must not find the old contents. Running requests keep their weights until they finish.
    prefix = keys_prefix(tenant, name)
    service.host.drop_matching(prefix)
    await state.engine.evict_adapter(prefix)
    await drop_stacks(service, state.engine, prefix)
    return versions
