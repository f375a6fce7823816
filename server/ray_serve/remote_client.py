"""The ingress's engine: EngineClient's interface over Ray Serve engine replicas.

The ingress runs the whole HTTP layer (server.api: OpenAI routes, admin API, tenant keys and quotas,
metrics) on a `RemoteEngineClient` instead of an in-process EngineClient. It holds the tokenizer and
the model's facts (limits, names), so prompts are validated and tokenized here; `generate` sends a
GenerateSpec to a replica through the DeploymentHandle and yields the RequestOutputs that stream back.

- Routing: a registry adapter's request carries its identity (tenant/name@vN) as Ray Serve's
  multiplexed model id, so it goes to a replica that holds the adapter (affinity); base-model and
  static-adapter requests carry none and go to the least loaded replica.
- Failures: a replica that dies before it streamed anything is retried on another (a new routing);
  once tokens went out, the request fails with a retryable 503 (Retry-After; in-band for a stream).
- State: replicas report to the board (server.ray_serve.board) every second; /health, /metrics and the
  admin API's residency read the latest snapshot, polled in the background. Pins and deletes are posted
  there for every replica to apply.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Gauge

from adapters_store import AdapterManifest
from server.adapters.service import AdapterService, device_key
from server.engine.client import AdapterSummary, EngineClient, RequestFailed, RequestOutput, Sequence, TextOps
from server.adapters.stacking import check_member_family
from server.errors import NotPinnable
from server.metrics import Metrics
from server.ray_serve.board import STALE_AFTER_S
from server.ray_serve.wire import Failed, GenerateSpec, Progress, RemoteAdapter, RemoteStack, Started

log = logging.getLogger("hotswap.ray")

MAX_RETRIES = 2  # new routings for a request whose replica died before it streamed anything
RETRY_BACKOFF_S = 0.5  # times the attempt number: Ray needs a moment to mark the replica dead
POLL_INTERVAL_S = 1.0
REPLICA_LOST = "the engine replica serving this request stopped; retry"
REPLICA_LOST_CODE = "replica_unavailable"
REPLICA_FAILED = "the engine replica failed to serve this request"

# The replicas that served the current HTTP request: set per request by ReplicaHeader (server.ray_serve.ingress).
SERVED_BY: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("hotswap_served_by", default=None)


@dataclass(frozen=True, slots=True)
class ParsedAdapter:
    """What `parse_adapter` answers on the ingress: the summary a replica found (weights stay there)."""

    summary: AdapterSummary

    @property
    def family(self) -> str:
        return self.summary.family

    def module_units(self) -> dict[str, int]:
        return self.summary.units


def _replica_errors() -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """(the replica is gone or unreachable: worth routing again, the replica raised: its bug)."""
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.ActorUnavailableError), exceptions.RayTaskError


class RemoteEngineClient(TextOps):
    def __init__(self, handle, board, facts: dict, max_retries: int = MAX_RETRIES, affinity: bool = True):
        from transformers import AutoTokenizer

        from server.models.config import ModelConfig

        self._handle, self._board = handle, board
        self.model_name: str = facts["model_name"]
        self.model_dir = Path(facts["model_dir"])
        if not (self.model_dir / "config.json").is_file():
            raise RuntimeError(f"the ingress needs the model's tokenizer and config.json at {self.model_dir}, where the replicas "
                               "load the model: on a multi-node cluster every node needs the model at that path")  # fmt: skip
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.limits = facts["limits"]
        self.static_adapters = frozenset(facts["static_adapters"])
        self.base_fingerprint: str = facts["base_fingerprint"]
        self._describe: dict = facts["describe"]
        self.max_retries = max_retries
        self.affinity = affinity  # False: Serve routes by load alone (the replica still loads what a request names)
        self._unavailable, self._replica_bug = _replica_errors()
        self._snapshot: dict = {"replicas": {}, "pinned": []}
        self._polled_at: float | None = None
        self._deployment: dict = {}  # Ray Serve's own view of the replica deployment (status, replica states)
        self._poller: asyncio.Task | None = None
        self._in_flight = 0
        self._failure: RequestFailed | None = None  # fail_all: every open stream ends with it
        self._refusal: RequestFailed | None = None  # fail_all(refuse_new=True): every new one too
        self._gauges: dict[int, _ReplicaGauges] = {}
        self._counted: dict[tuple[str, str], int] = {}  # (replica, counter) -> total already added to the metrics
        self.deployment_status = None  # callable -> dict, set by the ingress (Ray Serve's status API)

    is_per_user = staticmethod(EngineClient.is_per_user)

    # -- lifetime and description --------------------------------------------------------------------
    def start(self) -> None:
        self._poller = asyncio.ensure_future(self._poll_forever())

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    @property
    def healthy(self) -> bool:
        """At least one replica reported recently and healthy (before the first poll: the replica that
        answered the start-up facts was)."""
        if self._polled_at is None:
            return True
        return any(r["state"] == "ready" for r in self.replicas().values())

    def replicas(self) -> dict[str, dict]:
        """Each replica's state as the board last showed it: ready, unhealthy (its engine loop stopped) or
        stale (silent for STALE_AFTER_S: dead, or being replaced)."""
        out = {}
        for rid, r in sorted(self._snapshot["replicas"].items()):
            state = "stale" if r["age_s"] > STALE_AFTER_S else "ready" if r["healthy"] else "unhealthy"
            out[rid] = {"state": state, "node": r["node"], "actor": r["actor_name"], "age_s": r["age_s"], "running": r["running"],
                        "waiting": r["waiting"], "adapters_resident": r["adapters_resident"], "adapters_routed": len(r["multiplexed"]),
                        "adapter_hits": r["device_hits"], "adapter_misses": r["device_misses"], "adapter_evictions": r["device_evictions"],
                        "pinned": r["pinned"], "pin_failures": r["pin_failures"]}  # fmt: skip
        return out

    def describe(self) -> dict:
        return self._describe | {"serving": "ray serve", "replicas": self.replicas(), "deployment": self._deployment}

    def observe(self, metrics: Metrics) -> None:
        """The engine gauges summed over the live replicas, and per replica with a `replica` label."""
        gauges = self._gauges.get(id(metrics))
        if gauges is None:
            gauges = self._gauges[id(metrics)] = _ReplicaGauges(metrics)
        live = {rid: r for rid, r in self._snapshot["replicas"].items() if r["age_s"] <= STALE_AFTER_S}
        gauges.set(live, self.replicas())
        metrics.running.set(sum(r["running"] for r in live.values()))
        metrics.waiting.set(sum(r["waiting"] for r in live.values()))
        metrics.kv_blocks_used.set(sum(r["kv_blocks_used"] for r in live.values()))
        metrics.kv_blocks_total.set(sum(r["kv_blocks_total"] for r in live.values()))
        metrics.adapters_resident.set(sum(r["adapters_resident"] for r in live.values()))
        metrics.adapter_bytes.labels("device").set(sum(r["device_bytes"] for r in live.values()))
        for rid, r in live.items():
            for field, counter in (("device_hits", metrics.adapter_hits), ("device_misses", metrics.adapter_misses),
                                   ("device_evictions", metrics.adapter_evictions)):  # fmt: skip
                grown = r[field] - self._counted.get((rid, field), 0)
                if grown > 0:
                    counter.labels("device").inc(grown)
                self._counted[(rid, field)] = r[field]

    async def _poll_forever(self) -> None:
        polls = 0
        while True:
            try:
                self._snapshot = await self._board.snapshot.remote()
                self._polled_at = time.monotonic()
                if self.deployment_status is not None and polls % 5 == 0:  # a controller round trip: less often
                    self._deployment = await asyncio.to_thread(self.deployment_status)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the board restarting: keep the last snapshot, try again
                log.warning("reading the replicas' board failed: %s", e)
            polls += 1
            await asyncio.sleep(POLL_INTERVAL_S)

    # -- requests ------------------------------------------------------------------------------------
    @property
    def sequences_in_flight(self) -> int:
        return self._in_flight

    def fail_all(self, error: RequestFailed, refuse_new: bool = False) -> None:
        self._failure = error
        if refuse_new:
            self._refusal = error

    async def generate(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """The sequence's outputs from a replica; RequestFailed if it fails. Leaving early cancels it there."""
        if self._refusal is not None:
            raise RequestFailed(str(self._refusal), self._refusal.status, self._refusal.code)
        spec = _spec(seq)
        handle = self._handle.options(stream=True, multiplexed_model_id=spec.model_id if self.affinity else "")
        served = SERVED_BY.get()
        attempt, streamed = 0, False
        self._in_flight += 1
        try:
            while True:
                stream, ended = handle.generate.remote(spec), False
                try:
                    async for item in stream:
                        if isinstance(item, Started):
                            if served is not None and item.replica not in served:
                                served.append(item.replica)
                            continue
                        if isinstance(item, Failed):
                            ended = True
                            raise item.to_error()
                        if self._failure is not None:
                            raise RequestFailed(str(self._failure), self._failure.status, self._failure.code)
                        _note(seq, item)
                        streamed = True
                        yield item.output
                    ended = True
                    return
                except self._unavailable as e:
                    ended = True
                    if streamed or attempt >= self.max_retries:
                        log.warning("request %s lost its engine replica after %s: %s", seq.request_id,
                                    "streaming" if streamed else f"{attempt + 1} attempts", type(e).__name__)  # fmt: skip
                        raise RequestFailed(REPLICA_LOST, status=503, code=REPLICA_LOST_CODE) from None
                    attempt += 1
                    log.info("request %s: its engine replica stopped before answering (%s); routing it again", seq.request_id, type(e).__name__)
                    await asyncio.sleep(RETRY_BACKOFF_S * attempt)
                except self._replica_bug as e:  # not the request's doing (those come as Failed): a bug, logged here
                    ended = True
                    log.error("request %s: the engine replica raised: %s", seq.request_id, e)
                    raise RequestFailed(REPLICA_FAILED, status=500, code="replica_error") from None
                finally:
                    if not ended:  # the client left, or fail_all: the replica aborts the sequence
                        stream.cancel()
        finally:
            self._in_flight -= 1

    # -- adapters ------------------------------------------------------------------------------------
    async def validate_adapter(self, files: dict[str, bytes], name: str, family: str | None = None) -> AdapterSummary:
        return _answer(await self._handle.validate_adapter.remote(files, name, family))

    def parse_adapter(self, files: dict[str, bytes], name: str, family: str | None = None) -> ParsedAdapter:
        """Blocking (callers run it on a worker thread, as they do the in-process parse)."""
        return ParsedAdapter(_answer(self._handle.validate_adapter.remote(files, name, family).result()))

    async def check_user_state(self, m: AdapterManifest, state: dict) -> None:
        _answer(await self._handle.check_user_state.remote(m, state))

    async def residency(self, key: str) -> tuple[bool, bool]:
        """(in some replica's device pools, pinned on every replica) as of the last reports."""
        snap = await self._board.snapshot.remote()
        fresh = [r for r in snap["replicas"].values() if r["age_s"] <= STALE_AFTER_S]
        return any(key in r["resident"] for r in fresh), key in snap["pinned"]

    async def pin(self, key: str, weights, family: str) -> None:
        """Every replica pins it with its next report (within a second); one that cannot (no room) says so
        in the admin's /health (`pin_failures`)."""
        if self.is_per_user(family):
            raise NotPinnable(f"{family} adapters are made per user on demand: there is no one device copy to pin")
        await self._board.pin.remote(key, weights.manifest)

    async def unpin(self, key: str) -> None:
        await self._board.unpin.remote(key)

    async def evict_adapter(self, prefix: str) -> None:
        await self._board.evict.remote(prefix)


class RemoteAdapterService(AdapterService):
    """The ingress's AdapterService: names resolve here, against the shared registry (404s, tenants, the
    latest version), but weights are never loaded here — a request carries the resolved manifest to a
    replica, which loads exactly that version."""

    def __init__(self, registry, disk_cache, client: RemoteEngineClient, metrics=None):
        from server.adapters.host_cache import HostCache

        super().__init__(registry, disk_cache, HostCache(0), client.parse_adapter, None, client.base_fingerprint, metrics)
        self.client = client

    async def for_request(self, m: AdapterManifest, user: str | None) -> tuple[str, RemoteAdapter, str]:
        return device_key(m), RemoteAdapter(m, user), m.sha256  # the replica computes its own prefix identity

    async def weights(self, m: AdapterManifest) -> RemoteAdapter:
        return RemoteAdapter(m)

    async def check_user_state(self, m: AdapterManifest, state: dict) -> None:
        await self.client.check_user_state(m, state)

    async def for_stack(self, members, user: str | None, max_rank: int) -> tuple[str, RemoteStack, str]:
        """Several adapters merged (server.adapters.stacking): the families are checked here, the replica
        builds the stack (and finds a rank overflow) from the manifests the request carries."""
        for i, member in enumerate(members):
            check_member_family(member, i)
        return "stack", RemoteStack(tuple(members), user), ""  # the replica computes the key and prefix identity


class _ReplicaGauges:
    """Per-replica series beside the summed ones: hotswap_replica_*{replica}."""

    FIELDS = (("running", "Sequences in the replica's running batch"), ("waiting", "Sequences waiting on the replica"),
              ("kv_blocks_used", "KV-cache blocks in use on the replica"), ("adapters_resident", "Adapters in the replica's device pools"))  # fmt: skip

    def __init__(self, metrics: Metrics):
        r = metrics.registry
        self.up = Gauge("hotswap_replica_up", "1 while the engine replica reports as ready, else 0", ["replica"], registry=r)
        self.values = {f: Gauge(f"hotswap_replica_{f}", doc, ["replica"], registry=r) for f, doc in self.FIELDS}
        self.known: set[str] = set()

    def set(self, live: dict[str, dict], states: dict[str, dict]) -> None:
        for rid in self.known - states.keys():  # gone from the board: drop its series
            self.up.remove(rid)
            for g in self.values.values():
                g.remove(rid)
        self.known = set(states)
        for rid, s in states.items():
            self.up.labels(rid).set(1 if s["state"] == "ready" else 0)
            for f, g in self.values.items():
                g.labels(rid).set(live[rid][f] if rid in live else 0)


def _spec(seq: Sequence) -> GenerateSpec:
    remote = seq.adapter_weights
    common = dict(prompt_token_ids=seq.prompt_token_ids, params=seq.params, request_id=seq.request_id, tenant=seq.tenant,
                  tenant_weight=seq.tenant_weight, streamed=seq.streamed)  # fmt: skip
    if isinstance(remote, RemoteAdapter):
        return GenerateSpec(**common, manifest=remote.manifest, user=remote.user)
    if isinstance(remote, RemoteStack):
        return GenerateSpec(**common, members=remote.members, user=remote.user)
    return GenerateSpec(**common, adapter=seq.adapter, prefix_identity=seq.prefix_identity)


def _note(seq: Sequence, item: Progress) -> None:
    """What the replica's engine learnt about the sequence, for the serving layer's metrics."""
    seq.num_cached_tokens = item.num_cached_tokens
    if item.queue_s is not None and seq.first_scheduled_time is None:
        seq.first_scheduled_time = seq.arrival_time + item.queue_s


def _answer(result):
    if isinstance(result, Failed):
        raise result.to_error()
    return result
