"""The ingress: the same FastAPI app as `hotswap serve` (OpenAI API, admin API, tenant keys and quotas,
/health, /metrics), built in the ingress replica around a RemoteEngineClient.

`HotswapIngress` is deployed with `serve.ingress()` and no app: Ray Serve calls its
`__serve_build_asgi_app__` when the ingress replica starts. That asks an engine replica for the model's
facts (limits, names, the model directory for the tokenizer), opens the shared registry, finds the board
by name, and builds the app — plus one middleware, `ReplicaHeader`, which names the replica(s) that
served a response in `x-hotswap-replica`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.limits import RequestLimits
from server.ray_serve.remote_client import SERVED_BY
from server.ray_serve.wire import REPLICA_HEADER

REPLICA_DEPLOYMENT = "EngineReplica"
INGRESS_DEPLOYMENT = "HotswapIngress"


@dataclass(frozen=True)
class IngressSettings:
    store: str
    s3_endpoint: str | None = None
    cache_dir: Path | None = None
    disk_cache_bytes: int = 20 * 2**30
    admin_key: str | None = None
    limits: RequestLimits | None = None
    enable_docs: bool = False
    log_level: str = "info"
    board: str = ""  # the board actor's name (set by server.ray_serve.app.deploy)
    affinity: bool = True  # route a registry adapter's requests by Serve's model multiplexing (False: by load only)


class HotswapIngress:
    """The ingress deployment's class (server.ray_serve.app wraps it with serve.ingress and serve.deployment)."""

    def __init__(self, engines, settings: IngressSettings):
        self.engines, self.settings = engines, settings  # engines: the DeploymentHandle of the engine replicas

    async def __serve_build_asgi_app__(self):
        from ray import serve

        from adapters_store import DiskCache, Registry, open_store
        from server.api.app import build_app
        from server.console import setup_logging
        from server.metrics import Metrics
        from server.models.embedded import hotswap_home
        from server.ray_serve.board import open_board
        from server.ray_serve.remote_client import RemoteAdapterService, RemoteEngineClient

        s = self.settings
        setup_logging(s.log_level)
        facts = await self.engines.facts.remote()  # waits for a replica to be up
        board = open_board(s.board)
        client = RemoteEngineClient(self.engines, board, facts, affinity=s.affinity)
        app_name = serve.get_replica_context().app_name
        client.deployment_status = lambda: _deployment_status(app_name)
        registry = Registry(open_store(s.store, s3_endpoint=s.s3_endpoint))
        disk = DiskCache(Path(s.cache_dir) if s.cache_dir else hotswap_home() / "adapter-cache", s.disk_cache_bytes)
        metrics = Metrics()
        service = RemoteAdapterService(registry, disk, client, metrics)
        app = build_app(client, api_key=s.admin_key, adapter_service=service, limits=s.limits, metrics=metrics, enable_docs=s.enable_docs)
        app.add_middleware(ReplicaHeader)
        return app


def _deployment_status(app_name: str) -> dict:
    """Ray Serve's own view of the engine deployment: its status and how many replicas are in which state."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {"status": "missing"}
    dep = app.deployments.get(REPLICA_DEPLOYMENT)
    if dep is None:
        return {"status": str(app.status)}
    return {"status": str(dep.status), "replica_states": {str(k): v for k, v in dep.replica_states.items()}}


class ReplicaHeader:
    """Adds `x-hotswap-replica: <replica id>[,<id>...]` to responses that engine replicas served.

    A stream's status line would go out before any replica was asked (a chat stream's first chunk, the
    role, needs none), so the response head — and whatever body comes before the first replica
    answered — is held until a replica is known or the body ends. Responses no replica served (errors,
    admin routes, /health) pass with their head held only until their (single) body message."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served: list[str] = []
        held: list[Message] = []
        token = SERVED_BY.set(served)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not served:
                    held.append(message)
                    return
                await send(_with_header(message, served))
                return
            if held:
                if not served and message.get("more_body", False) and message["type"] == "http.response.body":
                    held.append(message)
                    return
                start, rest = held[0], held[1:]
                held.clear()
                await send(_with_header(start, served) if served else start)
                for m in rest:
                    await send(m)
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
            if held:  # a response that ended without a final body message: let it out as it was
                for m in [_with_header(held[0], served) if served else held[0], *held[1:]]:
                    await send(m)
        finally:
            SERVED_BY.reset(token)


def _with_header(start: Message, served: list[str]) -> Message:
    headers = [*start.get("headers", []), (REPLICA_HEADER.encode(), ",".join(served).encode())]
    return {**start, "headers": headers}
