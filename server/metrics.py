"""Prometheus metrics (one registry per app, so several servers can live in one process).

Per-tenant series carry one `tenant` label and nothing finer (no adapter, no user), so their number
grows with the tenants in the registry only. The admin and open-mode callers count as ADMIN_TENANT,
a value no tenant can be named (names start with a letter or digit: adapters_store.manifest)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
ADMIN_TENANT = "_admin"


def tenant_label(tenant: str | None) -> str:
    return ADMIN_TENANT if tenant is None else tenant


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hotswap_requests_total", "Finished sequences (choices) by endpoint, outcome and tenant", ["endpoint", "outcome", "tenant"], registry=r)
        self.prompt_tokens = Counter("hotswap_prompt_tokens_total", "Prompt tokens processed, by tenant", ["tenant"], registry=r)
        self.generation_tokens = Counter("hotswap_generation_tokens_total", "Tokens generated, by tenant", ["tenant"], registry=r)
        self.latency = Histogram("hotswap_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("hotswap_time_to_first_token_seconds", "Time to first token, by tenant", ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("hotswap_queue_time_seconds", "From a sequence's arrival to its first admission to the batch, by tenant",
                                    ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.rate_limited = Counter("hotswap_rate_limited_requests_total", "Requests refused with 429 by tenant and the quota that refused them",
                                    ["tenant", "limit"], registry=r)  # fmt: skip
        self.prefix_queried = Counter("hotswap_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache, by tenant", ["tenant"], registry=r)
        self.prefix_hits = Counter("hotswap_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache, by tenant", ["tenant"], registry=r)
        self.tpot = Histogram("hotswap_time_per_output_token_seconds", "Mean time per output token after the first", buckets=_TOKEN_BUCKETS, registry=r)
        self.running = Gauge("hotswap_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("hotswap_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_blocks_used = Gauge("hotswap_kv_cache_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_blocks_total = Gauge("hotswap_kv_cache_blocks_total", "KV-cache blocks in all", registry=r)
        self.adapters_resident = Gauge("hotswap_adapters_resident", "Adapters resident in the device row pools", registry=r)
        self.step_seconds = Histogram("hotswap_step_seconds", "Duration of one engine step", buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_size = Histogram("hotswap_batch_size", "Sequences per engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.step_adapters = Histogram("hotswap_step_adapters", "Distinct adapters per engine step", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)

        self.adapter_hits = Counter("hotswap_adapter_cache_hits_total", "Adapter lookups served by a cache tier", ["tier"], registry=r)
        self.adapter_misses = Counter("hotswap_adapter_cache_misses_total", "Adapter lookups a cache tier could not serve", ["tier"], registry=r)
        self.adapter_load_seconds = Histogram("hotswap_adapter_load_seconds", "Time to bring a cold adapter into host RAM", ["source"], buckets=_LATENCY_BUCKETS, registry=r)
        self.adapter_evictions = Counter("hotswap_adapter_evictions_total", "Adapters evicted from a cache tier", ["tier"], registry=r)
        self.adapter_bytes = Gauge("hotswap_adapter_resident_bytes", "Bytes of adapter weights held by a cache tier", ["tier"], registry=r)
        self._seen = {"device_hits": 0, "device_misses": 0, "device_evictions": 0, "host_evictions": 0}

    def _count_since(self, name: str, total: int, counter) -> None:
        """Engine-side tallies are plain ints; turn their growth into counter increments."""
        delta = total - self._seen[name]
        if delta > 0:
            counter.inc(delta)
        self._seen[name] = total

    def observe_step(self, stats, engine) -> None:
        """Called on the engine thread after each step."""
        self.step_seconds.observe(stats.seconds)
        self.batch_size.observe(stats.num_seqs)
        self.step_adapters.observe(stats.num_adapters)
        self.observe_engine(engine)

    def observe_engine(self, engine) -> None:
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        self.kv_blocks_used.set(engine.block_manager.num_used)
        self.kv_blocks_total.set(engine.block_manager.num_blocks)
        mgr = engine.adapters
        self.adapters_resident.set(len(mgr.resident))
        self.adapter_bytes.labels("device").set(mgr.resident_bytes)
        self._count_since("device_hits", mgr.hits, self.adapter_hits.labels("device"))
        self._count_since("device_misses", mgr.misses, self.adapter_misses.labels("device"))
        self._count_since("device_evictions", mgr.evictions, self.adapter_evictions.labels("device"))

    def observe_tiers(self, service) -> None:
        self.adapter_bytes.labels("host").set(service.host.bytes_used)
        self.adapter_bytes.labels("disk").set(service.disk.bytes_used)
        self._count_since("host_evictions", service.host.evictions, self.adapter_evictions.labels("host"))
