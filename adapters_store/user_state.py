"""Per-user state of personalised adapters (RecLoRA), as `users/<tenant>/<adapter>/<user hash>.json`.

The OpenAI `user` field is free text, so objects are named by its sha256; the record keeps the
name. State is JSON: `{"user", "weights": [...]}` (mixing weights) or `{"user", "vector": [...]}`
(a user embedding the adapter's gate turns into weights), plus `updated_at`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import ManifestError, ObjectNotFound
from .manifest import utc_now_iso, validate_name
from .stores import ObjectStore

MAX_USER_CHARS = 256


def user_hash(user: str) -> str:
    return hashlib.sha256(user.encode()).hexdigest()


def user_state_key(tenant: str, adapter: str, user: str) -> str:
    return f"users/{validate_name(tenant, 'tenant name')}/{validate_name(adapter, 'adapter name')}/{user_hash(user)}.json"


async def put_user_state(store: ObjectStore, tenant: str, adapter: str, user: str, state: dict[str, Any]) -> dict[str, Any]:
    if not user or len(user) > MAX_USER_CHARS:
        raise ManifestError(f"user must be 1-{MAX_USER_CHARS} characters")
    if set(state) not in ({"weights"}, {"vector"}):
        raise ManifestError('user state must be {"weights": [...]} or {"vector": [...]}')
    values = next(iter(state.values()))
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise ManifestError("user state values must be a non-empty list of numbers")
    record = {"user": user, **state, "updated_at": utc_now_iso()}
    await store.put(user_state_key(tenant, adapter, user), json.dumps(record).encode())
    return record


async def get_user_state(store: ObjectStore, tenant: str, adapter: str, user: str) -> dict[str, Any] | None:
    try:
        raw = await store.get(user_state_key(tenant, adapter, user))
    except ObjectNotFound:
        return None
    return json.loads(raw)
