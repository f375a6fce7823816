"""What crosses between the ingress and the engine replicas: small, picklable values, and no Ray.

A request travels as a `GenerateSpec`: the prompt's token ids, the sampling parameters, who asks, and
the adapter as the ingress resolved it — for a registry adapter the exact manifest (tenant, name,
version, content hash), so that a replica loads exactly that version, never a stale one. The replica
answers with a stream: `Started` (which replica took it), then `Progress` messages (engine outputs,
several merged into one where they came close together: server.ray_serve.batching), or a
`Failed` carrying the request's error as status + code + message (exceptions are not pickled: their
constructors differ, and a class may not exist on the other side).
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters_store import AdapterManifest
from server.adapters.stacking import Member
from server.engine.async_engine import RequestOutput
from server.engine.sequence import RequestFailed, SamplingParams

REPLICA_HEADER = "x-hotswap-replica"  # names the engine replica(s) that served a response


def model_id(manifest: AdapterManifest) -> str:
    """Ray Serve's multiplexed model id of a registry adapter: its identity, tenant/name@vN (for a
    RecLoRA adapter the adapter, not the user: every user's mixture is made from the same bank)."""
    return f"{manifest.tenant}/{manifest.name}@v{manifest.version}"


@dataclass(frozen=True, slots=True)
class RemoteAdapter:
    """What the ingress puts in a Sequence's `adapter_weights` for a registry adapter: the manifest and
    the user, for the replica to materialise (the ingress itself never loads adapter weights)."""

    manifest: AdapterManifest
    user: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteStack:
    """A request's several adapters to merge (server.adapters.stacking), as the ingress resolved them: the
    replica builds the stacked LoRA from exactly these versions."""

    members: tuple[Member, ...]
    user: str | None = None


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    tenant: str | None
    tenant_weight: float
    # a registry adapter (the replica resolves weights, engine key and prefix identity itself) ...
    manifest: AdapterManifest | None = None
    user: str | None = None
    # ... or several registry adapters merged into one (the replica builds it; routed by load, not affinity) ...
    members: tuple[Member, ...] = ()
    # ... or the base model (None) / a static --adapter by name, with the ingress's prefix identity
    adapter: str | None = None
    prefix_identity: str | None = None
    streamed: bool = True  # the client reads outputs as they come; False: the replica sends the rest in one piece

    @property
    def model_id(self) -> str:
        """The multiplexed model id to route on: "" (any replica, the least loaded) without a registry adapter."""
        return model_id(self.manifest) if self.manifest is not None else ""


@dataclass(frozen=True, slots=True)
class Started:
    replica: str  # the replica's id, for the response header and /health


@dataclass(frozen=True, slots=True)
class Progress:
    output: RequestOutput
    queue_s: float | None  # arrival -> first admission to the batch on the replica, once known
    num_cached_tokens: int  # prompt tokens the replica's prefix cache supplied


@dataclass(frozen=True, slots=True)
class Failed:
    status: int
    code: str
    message: str

    @classmethod
    def of(cls, error: Exception) -> "Failed":
        """A request's own failure as the HTTP layer would answer it (domain errors, registry errors,
        RequestFailed); anything else is the replica's bug and stays a plain 500."""
        from server.api.errors import to_api_error  # the one status table (server/api/errors.py)

        try:
            api = to_api_error(error)
        except StopIteration:  # not a mapped error
            return cls(500, "request_failed", "the engine replica failed to serve this request")
        return cls(api.status, api.code or api.type, api.message)

    def to_error(self) -> RequestFailed:
        return RequestFailed(self.message, status=self.status, code=self.code)
