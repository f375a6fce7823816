"""Who is calling: the admin, a tenant (by API key), or anyone (open mode, loopback only)."""
from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from fastapi import Request

from adapters_store import Registry, StoreUnavailable
from server import errors
from server.api.errors import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str | None  # the caller's tenant; None for the admin and the open-mode caller
    admin: bool  # sees and uses every adapter

    def may_use(self, tenant: str, public: bool) -> bool:
        return self.admin or public or tenant == self.tenant


ADMIN = Principal(None, True)


def is_admin_request(request: Request, admin_key: str | None) -> bool:
    """The caller presents the admin key, or none is configured (open mode: loopback only)."""
    return admin_key is None or _is_admin(_bearer(request), admin_key)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _is_admin(token: str | None, admin_key: str | None) -> bool:
    return token is not None and admin_key is not None and hmac.compare_digest(token.encode(), admin_key.encode())


async def api_principal(request: Request, admin_key: str | None, registry: Registry | None) -> Principal:
    """For /v1: a tenant key scopes the caller to its tenant; without an admin key configured, no key is needed."""
    token = _bearer(request)
    if _is_admin(token, admin_key):
        return ADMIN
    if token is not None and registry is not None:
        try:
            tenant = await registry.tenant_for_key(token)
        except StoreUnavailable as e:
            log.warning("cannot check an API key: the adapter store is unreachable (%s)", e)
            raise errors.StoreUnavailable("cannot check the API key right now: retry later") from None
        if tenant is not None:
            return Principal(tenant, False)
    if admin_key is None:
        return ADMIN  # open mode: the server only listens on loopback
    raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def require_admin(request: Request, admin_key: str | None) -> None:
    if admin_key is not None and not _is_admin(_bearer(request), admin_key):
        raise APIError(401, "The admin API needs `Authorization: Bearer <admin key>`.", code="invalid_api_key")
