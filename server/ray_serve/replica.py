"""One engine replica: a hotswap engine with its own adapter tiers, behind Ray Serve.

Each replica is what `hotswap serve` runs in one process — LLMEngine on its own thread, EngineClient,
an AdapterService on the shared registry with its own disk and host caches — minus the HTTP layer,
which lives once, in the ingress (server.ray_serve.ingress). Requests arrive as `GenerateSpec`s
(server.ray_serve.wire) and stream back as `Started`, `Progress`..., or `Failed`; the outputs of a
sequence are merged into fewer messages (server.ray_serve.batching).

Adapter affinity is Ray Serve's model multiplexing: a request for a registry adapter carries its
identity (tenant/name@vN) as the multiplexed model id; the replica "loads the model" by bringing that
exact version's weights into host RAM, and Serve then routes the adapter's later requests to the
replicas that hold it. Serve's per-replica LRU (`max_num_models_per_replica`, sized from the device
adapter budget) only steers routing: the replica's tiers keep and evict weights by their own budgets.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from adapters_store import AdapterManifest, RegistryError
from server.adapters.service import build_adapter_service, device_key
from server.adapters.stacking import drop_stacks
from server.config import EngineConfig
from server.engine.client import EngineClient, RequestFailed, Sequence
from server.engine.llm_engine import LLMEngine
from server.errors import HotswapError
from server.metrics import Metrics
from server.ray_serve.batching import DEFAULT_INTERVAL_S, in_batches, merge_outputs
from server.ray_serve.board import open_board
from server.ray_serve.wire import Failed, GenerateSpec, Progress, Started

log = logging.getLogger("hotswap.ray")

REPORT_INTERVAL_S = 1.0  # how often a replica reports to the board (and picks up pins and evictions)
REQUEST_ERRORS = (RequestFailed, HotswapError, RegistryError)  # a request's own failure: told to the ingress, not raised


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica is built from (pickled once into the deployment)."""

    engine: EngineConfig
    store: str
    s3_endpoint: str | None = None
    cache_dir: Path | None = None
    disk_cache_bytes: int = 20 * 2**30
    host_adapter_bytes: int = 4 * 2**30
    board: str = ""  # the board actor's name (server.ray_serve.board); "" = none
    max_adapters: int = 64  # Ray Serve's max_num_models_per_replica
    stream_interval_s: float = DEFAULT_INTERVAL_S  # a streamed request's outputs merge over this (server.ray_serve.batching)
    log_level: str = "info"


@dataclass(frozen=True)
class LoadedAdapter:
    """Ray Serve's "model" for one multiplexed id on this replica: the version it names, whose weights
    were brought into host RAM when Serve first routed the id here. When Serve's per-replica LRU drops
    the id, only routing forgets it: the host and device tiers keep or evict the weights by their own
    budgets (a device copy still there serves the id's next request here at no cost, and a host copy
    saves a fetch from the store)."""

    manifest: AdapterManifest


class EngineReplica:
    """The class Ray Serve deploys as the engine replicas (server.ray_serve.app applies the decorator)."""

    def __init__(self, settings: ReplicaSettings):
        import ray
        from ray import serve

        from server.console import setup_logging

        setup_logging(settings.log_level)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.node = ray.util.get_node_ip_address()
        self.settings = settings
        self.engine = LLMEngine.on_own_thread(settings.engine)
        self.metrics = Metrics()
        self.client = EngineClient(self.engine, on_step=self.metrics.observe_step)
        self.service = build_adapter_service(self.engine, settings.store, settings.s3_endpoint, settings.cache_dir,
                                             settings.disk_cache_bytes, settings.host_adapter_bytes, self.metrics)  # fmt: skip
        self.client.start()
        self._content: dict[str, str] = {}  # engine key -> sha256 of the version this replica holds under it
        self._manifests: dict[str, AdapterManifest] = {}  # multiplexed id -> the manifest a request brought for it
        self._pinned: set[str] = set()
        self._pin_failures: dict[str, str] = {}  # engine key -> why pinning it failed here (reported, not retried)
        self._reporter: asyncio.Task | None = None
        self._board = open_board(settings.board) if settings.board else None

        async def load(adapter_id: str) -> LoadedAdapter:
            return await self._load(adapter_id)

        self._adapter_loader = load  # a plain function: Serve keeps its per-replica LRU (the multiplex wrapper) on it
        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters)(load)
        log.info("engine replica %s (%s) ready: %s", self.replica_id, self.actor_name, self.client.describe())

    # -- facts, health ------------------------------------------------------------------------------
    async def facts(self) -> dict:
        """What the ingress needs to validate requests and describe the model (it loads no weights)."""
        self._start_reporting()
        c = self.client
        return {"model_name": c.model_name, "model_dir": str(c.model_dir), "limits": c.limits, "static_adapters": sorted(c.static_adapters),
                "base_fingerprint": c.base_fingerprint, "describe": c.describe(), "replica": self.replica_id}  # fmt: skip

    async def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        self._start_reporting()
        if not self.client.healthy:
            raise RuntimeError("the engine loop has stopped")

    def state(self) -> dict:
        """This replica as the board shows it (the engine's gauges are read without a lock, as /metrics does)."""
        e, adapters = self.engine, self.engine.adapters
        wrapper = getattr(self._adapter_loader, "__serve_multiplex_wrapper", None)  # Ray Serve's; absent before the first adapter
        return {
            "actor_name": self.actor_name, "node": self.node, "healthy": self.client.healthy,
            "running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
            "kv_blocks_used": e.block_manager.num_used, "kv_blocks_total": e.block_manager.num_blocks,
            "adapters_resident": len(adapters.resident), "device_bytes": adapters.resident_bytes,
            "device_hits": adapters.hits, "device_misses": adapters.misses, "device_evictions": adapters.evictions,
            "resident": sorted(adapters.resident), "pinned": sorted(self._pinned), "pin_failures": dict(self._pin_failures),
            "multiplexed": sorted(wrapper.models) if wrapper is not None else [],
            "sequences_in_flight": self.client.sequences_in_flight,
        }  # fmt: skip

    # -- requests -----------------------------------------------------------------------------------
    async def generate(self, spec: GenerateSpec) -> AsyncIterator[Started | Progress | Failed]:
        """Started at once (the ingress names this replica in its response), then the outputs. A request's
        own failure ends the stream with Failed; leaving early (the client gone) aborts the sequence."""
        self._start_reporting()
        yield Started(self.replica_id)
        try:
            seq = await self._sequence(spec)
            queue_s = None
            interval = self.settings.stream_interval_s if spec.streamed else None  # not streamed: the rest in one piece
            async with contextlib.aclosing(in_batches(self.client.generate(seq), interval)) as batches:
                async for outs in batches:
                    if queue_s is None and seq.first_scheduled_time is not None:
                        queue_s = max(0.0, seq.first_scheduled_time - seq.arrival_time)
                    yield Progress(merge_outputs(outs), queue_s, seq.num_cached_tokens)
        except REQUEST_ERRORS as e:
            yield Failed.of(e)

    async def _sequence(self, spec: GenerateSpec) -> Sequence:
        adapter, weights, identity = spec.adapter, None, spec.prefix_identity
        if spec.manifest is not None:
            m = spec.manifest
            from ray import serve

            adapter_id = serve.get_multiplexed_model_id() or spec.model_id  # the same, through the ingress
            self._manifests[adapter_id] = m
            await self._adapter(adapter_id)  # affinity: Serve now routes this id here first
            await self._refresh(m)
            adapter, weights, identity = await self.service.for_request(m, spec.user)
        elif spec.members:  # several adapters merged: built here from the versions the ingress resolved
            for member in spec.members:
                await self._refresh(member.manifest)
            adapter, weights, identity = await self.service.for_stack(list(spec.members), spec.user, self.client.limits.max_lora_rank)
        seq = Sequence(list(spec.prompt_token_ids), spec.params, adapter, adapter_weights=weights, request_id=spec.request_id,
                       tenant=spec.tenant, tenant_weight=spec.tenant_weight, prefix_identity=identity)  # fmt: skip
        if spec.params.guided is not None:  # structured output: compiled here, off the engine thread (never pickled)
            seq.grammar = await self.client.compile_guided(spec.params.guided)
        return seq

    async def _load(self, adapter_id: str) -> LoadedAdapter:
        """Bring the version named by the multiplexed id into host RAM (fetching it from the shared store)."""
        m = self._manifests.pop(adapter_id, None)
        if m is None:  # not brought by a request (cannot happen through the ingress): read it from the store
            tenant_name, _, version = adapter_id.rpartition("@v")
            tenant, _, name = tenant_name.partition("/")
            m = await self.service.registry.get(tenant, name, int(version))
        await self._refresh(m)
        await self.service.weights(m)
        return LoadedAdapter(m)

    async def _refresh(self, m: AdapterManifest) -> None:
        """A name deleted and uploaded again starts over at v1: the same engine key, other contents. Drop
        what this replica holds under the key before serving the new contents (as a delete through the
        single-process server does)."""
        key = device_key(m)
        held = self._content.get(key)
        if held is not None and held != m.sha256:
            log.info("adapter %s changed contents in the store: dropping the copy held here", key)
            await self._forget(key)
        self._content[key] = m.sha256

    async def _forget(self, key: str) -> None:
        self.service.host.drop(key)
        self._content.pop(key, None)
        self._pinned.discard(key)
        await self.client.evict(key)  # requests using it finish first

    # -- the admin API's work, done where the model is --------------------------------------------
    async def validate_adapter(self, files: dict[str, bytes], name: str, family: str | None):
        try:
            return await self.client.validate_adapter(files, name, family)
        except REQUEST_ERRORS as e:
            return Failed.of(e)

    async def check_user_state(self, m: AdapterManifest, state: dict):
        try:
            await self.service.check_user_state(m, state)
        except REQUEST_ERRORS as e:
            return Failed.of(e)
        return None

    # -- the board: reports out, pins and evictions in ----------------------------------------------
    def _start_reporting(self) -> None:
        if self._reporter is None and self._board is not None:
            self._reporter = asyncio.ensure_future(self._report_forever())

    async def _report_forever(self) -> None:
        seen = None
        while True:
            try:
                reply = await self._board.report.remote(self.replica_id, self.state(), seen)
                seen = reply["evictions_seen"]
                await self._apply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the board restarting, a pin that fails: report again next time
                log.warning("replica %s: reporting to the board failed: %s", self.replica_id, e)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def _apply(self, reply: dict) -> None:
        for prefix in reply["evictions"]:  # server.adapters.service.keys_prefix: every version and user copy
            self.service.host.drop_matching(prefix)
            await drop_stacks(self.service, self.client, prefix)  # and every merge made with it
            for key in {k for k in (*self._content, *self.engine.adapters.resident) if k.startswith(prefix)}:
                await self._forget(key)
        pins: dict[str, AdapterManifest] = reply["pins"]
        for key, m in pins.items():
            if key in self._pinned or key in self._pin_failures:
                continue
            try:
                await self._refresh(m)
                await self.client.pin(key, await self.service.weights(m), m.family)
                self._pinned.add(key)
            except REQUEST_ERRORS as e:
                self._pin_failures[key] = Failed.of(e).message
                log.warning("replica %s cannot pin %s: %s", self.replica_id, key, self._pin_failures[key])
        for key in sorted(self._pinned - pins.keys()):
            self._pinned.discard(key)
            await self.client.unpin(key)
        for key in [k for k in self._pin_failures if k not in pins]:
            del self._pin_failures[key]

    def __del__(self) -> None:
        # Ray Serve calls this when it stops the replica (scale-down, redeploy, shutdown)
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        client = getattr(self, "client", None)
        if client is not None:
            client.stop()
