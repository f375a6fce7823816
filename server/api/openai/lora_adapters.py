"""vLLM's runtime adapter endpoints: POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter (admin key).

Same bodies, status codes and answers as vLLM 0.32 (vllm/entrypoints/serve/lora/ and
openai/models/serving.py): `{"lora_name", "lora_path", "load_inplace"}` loads, `{"lora_name"}` unloads;
success is a 200 whose plain-text body says "Success: LoRA adapter '<name>' added successfully." (or
"removed"); a missing field, a name taken by the base model, a name already loaded without
`load_inplace` are 400s, a path that does not exist and an unknown name to unload are 404s. Errors have
hotswap's OpenAI-style body (vLLM's carries the status number as `code`).

Where vLLM keeps the adapter in its process, hotswap publishes it to the registry: a public adapter
of the tenant `runtime` (server.adapters.service.RUNTIME_TENANT, created on first use), so that every
caller uses it with `model=<lora_name>` as in vLLM (a caller's own adapter of the same name comes
first), on every Ray replica, and across restarts. `load_inplace` publishes a new version (new engine key,
new prefix identity: unlike vLLM, KV computed with the old weights is never reused). Unloading deletes
every version and drops it from every cache tier, as the admin API's delete does.

`lora_path` is a directory on the server's filesystem holding a PEFT adapter (adapter_config.json +
adapter_model.safetensors). It is read with the upload's limits and validated by the same code
(server.api.admin.lifecycle.publish_files): only regular files, together within --max-adapter-bytes,
none a symbolic link out of the directory, never a pickle. Anything wrong with it is a 400 (vLLM: 500).
"""
from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request, Response
from pydantic import Field

from adapters_store import AdapterNotFound, InvalidName, TenantExists, TenantNotFound, validate_name
from server.adapters.service import RUNTIME_TENANT
from server.api.admin.lifecycle import delete_everywhere, publish_files
from server.api.errors import NOT_FOUND, APIError
from server.engine.client import ADAPTER_FILES
from server.validation import StrictModel, Text

log = logging.getLogger("hotswap.api")
router = APIRouter(prefix="/v1")

CONFIG_FILE, WEIGHTS_FILE = ADAPTER_FILES
LORA_PATH_KEY = "lora_path"  # in the manifest's provenance: where the adapter was loaded from (the admin's /v1/models shows it as `root`)
LOADED_BY = "/v1/load_lora_adapter"


class LoadLoRAAdapterRequest(StrictModel):
    lora_name: Annotated[Text, Field(max_length=512)]
    lora_path: Annotated[Text, Field(max_length=4096)]
    load_inplace: bool = False
    is_3d_lora_weight: bool = False  # vLLM: MoE weights stored 3-D; not served here


class UnloadLoRAAdapterRequest(StrictModel):
    lora_name: Annotated[Text, Field(max_length=512)]
    lora_int_id: int | None = None  # vLLM accepts and ignores it


def _admin_state(request: Request):
    principal = getattr(request.state, "principal", None)
    if principal is None:  # fail closed if the guard did not see this route
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not principal.admin:
        raise APIError(403, "loading and unloading adapters needs the admin key", type="permission_error", code="admin_key_required")
    state = request.app.state
    if state.adapter_service is None:
        raise APIError(404, "this server runs without an adapter registry: it cannot load adapters at run time", type=NOT_FOUND, code="no_registry")
    return state


def _bad_path(message: str, code: str = "invalid_lora_path") -> APIError:
    return APIError(400, message, param="lora_path", code=code)


def read_lora_dir(lora_path: str, lora_name: str, limit: int) -> dict[str, bytes]:
    """The PEFT files of the directory `lora_path`, within `limit` bytes together (blocking: run it on a thread)."""
    if "\x00" in lora_path or not lora_path.strip():
        raise _bad_path("lora_path must be a directory path")
    try:
        root = Path(lora_path).expanduser().resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        # vLLM's answer (LoRAAdapterNotFoundError) for a path that holds nothing
        raise APIError(404, f"Loading lora {lora_name} failed: No adapter found for {lora_path}", type=NOT_FOUND, param="lora_path",
                       code="lora_not_found") from None  # fmt: skip
    except (OSError, RuntimeError):  # a symlink loop, no permission
        raise _bad_path("lora_path cannot be read by the server") from None
    if not root.is_dir():
        raise _bad_path("lora_path must be a directory holding a PEFT adapter (adapter_config.json and adapter_model.safetensors)")
    files: dict[str, bytes] = {}
    total = 0
    for name in ADAPTER_FILES:
        path = root / name
        if not os.path.lexists(path):
            hint = " (pickled adapter_model.bin is never loaded: convert it to safetensors)" if name == WEIGHTS_FILE and (root / "adapter_model.bin").exists() else ""
            what = "not a PEFT adapter directory" if name == CONFIG_FILE else "the adapter's weights are missing"
            raise _bad_path(f"lora_path has no {name}: {what}{hint}")
        try:
            real = path.resolve(strict=True)
            if not real.is_relative_to(root):
                raise _bad_path(f"{name} in lora_path is a symbolic link out of the adapter directory", code="unsafe_path")
            info = os.stat(real)
            if not stat.S_ISREG(info.st_mode):
                raise _bad_path(f"{name} in lora_path is not a regular file", code="unsafe_path")
            total += info.st_size
            if total > limit:
                raise _bad_path(f"the adapter at lora_path exceeds {limit} bytes (--max-adapter-bytes)", code="adapter_too_large")
            with open(real, "rb") as f:
                data = f.read(limit - total + info.st_size + 1)  # it may have grown since stat
        except APIError:
            raise
        except (OSError, RuntimeError):
            raise _bad_path(f"{name} in lora_path cannot be read by the server") from None
        total += len(data) - info.st_size
        if total > limit:
            raise _bad_path(f"the adapter at lora_path exceeds {limit} bytes (--max-adapter-bytes)", code="adapter_too_large")
        files[name] = data
    return files


async def _ensure_runtime_tenant(registry) -> None:
    try:
        await registry.get_tenant(RUNTIME_TENANT)
    except TenantNotFound:
        try:
            await registry.create_tenant(RUNTIME_TENANT)
        except TenantExists:  # created meanwhile
            pass


def _success(message: str) -> Response:
    return Response(status_code=200, content=message)  # vLLM: a bare text body, no media type


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    state = _admin_state(request)
    name = body.lora_name
    if not name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    if name == state.engine.model_name or name in state.engine.static_adapters:
        raise APIError(400, f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
    if body.is_3d_lora_weight:
        raise APIError(400, "is_3d_lora_weight is not supported: load a PEFT LoRA adapter", param="is_3d_lora_weight")
    try:
        validate_name(name, "lora_name")
    except InvalidName as e:
        raise APIError(400, f"{e} (hotswap's adapter names)", param="lora_name") from None
    registry = state.registry
    if not body.load_inplace and await registry.versions(RUNTIME_TENANT, name):
        raise APIError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True.",
                       param="lora_name")  # fmt: skip
    files = await asyncio.to_thread(read_lora_dir, body.lora_path, name, state.limits.max_adapter_bytes)
    await _ensure_runtime_tenant(registry)
    manifest = await publish_files(state, RUNTIME_TENANT, name, files, public=True, new_version=body.load_inplace,
                                   provenance={"loaded_by": LOADED_BY, LORA_PATH_KEY: body.lora_path})  # fmt: skip
    log.info("loaded LoRA adapter %s (v%d) from %s", name, manifest.version, body.lora_path)
    return _success(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    state = _admin_state(request)
    name = body.lora_name
    if not name:
        raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
    not_found = APIError(404, f"The lora adapter '{name}' cannot be found.", type=NOT_FOUND, param="lora_name", code="lora_not_found")
    try:
        validate_name(name, "lora_name")
        await delete_everywhere(state, RUNTIME_TENANT, name)
    except (InvalidName, AdapterNotFound):
        raise not_found from None
    log.info("unloaded LoRA adapter %s", name)
    return _success(f"Success: LoRA adapter '{name}' removed successfully.")
