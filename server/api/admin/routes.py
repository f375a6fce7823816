"""Routes of the admin API (`Authorization: Bearer <admin key>` when one is configured)."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.tenants import MAX_WEIGHT, MIN_WEIGHT
from server.adapters.service import device_key
from server.api.admin.lifecycle import delete_everywhere, publish_files
from server.api.admin.uploads import ARCHIVE_SUFFIXES, extract_archive
from server.api.errors import APIError, too_large
from server.errors import InvalidRequest
from server.validation import StrictModel, Text

router = APIRouter(prefix="/admin/v1")


class TenantCreate(StrictModel):
    name: Annotated[Text, Field(max_length=256)]


class TenantUpdate(StrictModel):
    """PATCH body: the settings to change; a quota set to null is removed (unlimited)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting must not be ignored silently
    weight: Annotated[float, Field(ge=MIN_WEIGHT, le=MAX_WEIGHT)] = 1.0  # its share under fair scheduling
    max_concurrent_requests: Annotated[int, Field(ge=1)] | None = None
    requests_per_minute: Annotated[int, Field(ge=1)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1)] | None = None


def _admin(request: Request):
    """The app's state for an admin route (the admin key was checked before the body was read: server.api.guard)."""
    if not getattr(request.state, "admin_checked", False):  # fail closed if the guard did not see this route
        raise APIError(401, "The admin API needs `Authorization: Bearer <admin key>`.", code="invalid_api_key")
    state = request.app.state
    if state.adapter_service is None:
        raise APIError(404, "this server runs without an adapter registry", code="no_registry")
    return state


# -- tenants and keys ---------------------------------------------------------------------------
@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, request: Request):
    state = _admin(request)
    return await state.registry.create_tenant(body.name)


@router.get("/tenants")
async def list_tenants(request: Request):
    state = _admin(request)
    return {"data": await state.registry.list_tenants()}


@router.get("/tenants/{tenant}")
async def get_tenant(tenant: str, request: Request):
    state = _admin(request)
    return await state.registry.get_tenant(tenant)


@router.patch("/tenants/{tenant}")
async def update_tenant(tenant: str, body: TenantUpdate, request: Request):
    """Change the tenant's weight and quotas; they apply to its next request (server.api.quotas)."""
    state = _admin(request)
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise InvalidRequest(f"give at least one of {', '.join(TenantUpdate.model_fields)}")
    return await state.registry.update_tenant_settings(tenant, changes)


@router.post("/tenants/{tenant}/keys", status_code=201)
async def create_key(tenant: str, request: Request):
    state = _admin(request)
    key_id, key = await state.registry.create_key(tenant)
    return {"tenant": tenant, "id": key_id, "key": key}


@router.delete("/tenants/{tenant}/keys/{key_id}", status_code=204)
async def delete_key(tenant: str, key_id: str, request: Request):
    state = _admin(request)
    await state.registry.delete_key(tenant, key_id)
    return Response(status_code=204)


# -- adapters -----------------------------------------------------------------------------------
def _manifest_json(m) -> dict:
    return dataclasses.asdict(m)


@router.post("/adapters", status_code=201)
async def upload_adapter(request: Request):
    state = _admin(request)
    limit = state.limits.max_adapter_bytes  # the whole body is capped while it streams in (server.api.guard)
    try:
        form = await request.form(max_files=4, max_fields=16)
    except StarletteHTTPException as e:
        if e.status_code == 413:
            raise
        raise APIError(400, f"expected a multipart/form-data upload ({e.detail})") from None
    except Exception:  # a malformed body can trip the multipart parser in many ways; none is worth echoing
        raise APIError(400, "expected a multipart/form-data upload") from None
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    uploads = [(k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    tenant, name = fields.get("tenant"), fields.get("name")
    if not tenant or not name:
        raise APIError(400, "the form needs the fields `tenant` and `name`", param="tenant" if not tenant else "name")
    family = fields.get("family") or None  # detected from the files when not given
    public = fields.get("public", "false").lower() in ("1", "true", "yes")
    new_version = fields.get("new_version", "false").lower() in ("1", "true", "yes")

    files: dict[str, bytes] = {}
    total = 0
    for field, upload in uploads:
        data = await upload.read(limit + 1)
        total += len(data)
        if len(data) > limit or total > limit:
            raise too_large(limit, upload=True)
        filename = upload.filename or field
        if field == "archive" or filename.endswith(ARCHIVE_SUFFIXES):
            files.update(await asyncio.to_thread(extract_archive, data, filename, limit))  # decompression: off the event loop
        else:
            files[filename.rsplit("/", 1)[-1]] = data
    manifest = await publish_files(state, tenant, name, files, family=family, description=fields.get("description", ""), public=public,
                                   new_version=new_version)  # fmt: skip
    return JSONResponse(_manifest_json(manifest), status_code=201)


@router.get("/adapters")
async def list_adapters(request: Request, tenant: str | None = None):
    state = _admin(request)
    return {"data": [_manifest_json(m) for m in await state.registry.list(tenant)]}


@router.get("/adapters/{tenant}/{name}")
async def get_adapter(tenant: str, name: str, request: Request):
    state = _admin(request)
    service = state.adapter_service
    m = await service.manifest(tenant, name, fresh=True)
    key = device_key(m)
    device, pinned = await state.engine.residency(key)
    body = _manifest_json(m)
    body["residency"] = {
        "device": device,
        "host": key in service.host,
        "disk": all(f["sha256"] in service.disk for f in m.files.values()),
        "store": True,
    }
    body["pinned"] = pinned
    return body


@router.delete("/adapters/{tenant}/{name}")
async def delete_adapter(tenant: str, name: str, request: Request):
    state = _admin(request)
    versions = await delete_everywhere(state, tenant, name)
    return {"deleted": f"{tenant}/{name}", "versions": versions}


@router.post("/adapters/{tenant}/{name}/pin")
async def pin_adapter(tenant: str, name: str, request: Request):
    state = _admin(request)
    service = state.adapter_service
    m = await service.manifest(tenant, name, fresh=True)
    weights = None if state.engine.is_per_user(m.family) else await service.weights(m)
    await state.engine.pin(device_key(m), weights, m.family)
    return {"pinned": f"{tenant}/{name}", "version": m.version}


@router.post("/adapters/{tenant}/{name}/unpin")
async def unpin_adapter(tenant: str, name: str, request: Request):
    state = _admin(request)
    service = state.adapter_service
    m = await service.manifest(tenant, name)
    await state.engine.unpin(device_key(m))
    return {"unpinned": f"{tenant}/{name}"}


# -- per-user state of personalised adapters (RecLoRA) ----------------------------------------
class UserState(StrictModel):
    # finite numbers only (StrictModel); the adapter checks the length
    weights: list[float] | None = Field(None, max_length=4096)
    vector: list[float] | None = Field(None, max_length=65536)


@router.put("/adapters/{tenant}/{name}/users/{user}")
async def put_user_state(tenant: str, name: str, user: str, body: UserState, request: Request):
    state = _admin(request)
    service = state.adapter_service
    m = await service.manifest(tenant, name, fresh=True)
    values = {k: v for k, v in body.model_dump().items() if v is not None}
    if len(values) != 1:
        raise InvalidRequest('give exactly one of "weights" (one per meta-LoRA) or "vector" (the user embedding)')
    await service.check_user_state(m, values)
    record = await state.registry.put_user_state(tenant, name, user, values)
    service.forget_user(tenant, name, user)
    return record


@router.get("/adapters/{tenant}/{name}/users/{user}")
async def get_user_state(tenant: str, name: str, user: str, request: Request):
    state = _admin(request)
    record = await state.registry.get_user_state(tenant, name, user)
    if record is None:
        raise APIError(404, f"no state stored for this user of {tenant}/{name} (it is served with uniform weights)", type="not_found_error")
    return record
