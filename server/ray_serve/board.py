"""The replicas' notice board: one small Ray actor that the ingress reads and every replica writes.

Ray Serve routes requests to *some* replica; it has no call that reaches *each* one. The board fills
that gap, both ways:

- every replica reports its state once a second (`report`): its id and actor name, the engine's gauges,
  which adapters sit in its device pools. The ingress reads them all (`snapshot`) for /health,
  /metrics and the admin API's residency; a replica silent for longer than a few seconds is stale.
- the ingress posts what every replica must apply (`pin`, `unpin`, `evict`); each replica picks it up
  with its next report. Pins are a desired state (a replica started later pins them too); evictions
  (an adapter deleted) are a log that each replica reads from where it was when it started.
"""
from __future__ import annotations

import time

from adapters_store import AdapterManifest

BOARD_NAMESPACE = "hotswap"
STALE_AFTER_S = 5.0  # a replica that has not reported for this long is listed as stale


def board_name(app_name: str) -> str:
    return f"hotswap-board-{app_name}"


def open_board(name: str):
    """The board actor of that name, created by whoever comes first (the deploying driver, the ingress or a
    replica: under `serve run` or a KubeRay RayService no driver of ours runs). Detached, so that it outlives
    any one of them; `server.ray_serve.app.undeploy` ends it."""
    import ray

    return ray.remote(ReplicaBoard).options(name=name, namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0).remote()


class ReplicaBoard:
    """Plain Python: server.ray_serve.app wraps it with ray.remote (num_cpus=0, detached, named)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict] = {}  # replica id -> its last report, with "reported_at" (time.time())
        self.pins: dict[str, AdapterManifest | None] = {}  # engine key -> manifest (None: a per-user family, nothing to pin)
        self.evictions: list[str] = []  # key prefixes (server.adapters.service.keys_prefix), in the order posted

    def report(self, replica: str, state: dict, evictions_seen: int | None) -> dict:
        """Record a replica's state; answer what it must apply: the pins, and evictions after `evictions_seen`
        (None: a new replica, which starts at the end of the log: it holds nothing to evict)."""
        self.reports[replica] = state | {"reported_at": time.time()}
        start = len(self.evictions) if evictions_seen is None else evictions_seen
        return {"pins": dict(self.pins), "evictions": self.evictions[start:], "evictions_seen": len(self.evictions)}

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def snapshot(self) -> dict:
        """Every replica's last report with its age in seconds, and the pinned keys."""
        now = time.time()
        replicas = {rid: r | {"age_s": round(now - r["reported_at"], 3)} for rid, r in self.reports.items()}
        # replicas gone for good (replaced after a crash, scaled down) drop off after a while
        for rid in [rid for rid, r in replicas.items() if r["age_s"] > 60 * STALE_AFTER_S]:
            del self.reports[rid], replicas[rid]
        return {"replicas": replicas, "pinned": sorted(self.pins)}

    def pin(self, key: str, manifest: AdapterManifest | None) -> None:
        self.pins[key] = manifest

    def unpin(self, key: str) -> None:
        self.pins.pop(key, None)

    def evict(self, prefix: str) -> None:
        """Every replica drops the keys starting with `prefix` (an adapter's versions and user copies)."""
        for key in [k for k in self.pins if k.startswith(prefix)]:
            del self.pins[key]
        self.evictions.append(prefix)
