"""`hotswap serve --ray`: its flags, and serving on Ray Serve until a signal.

Only `serve_on_ray` imports Ray: `add_ray_arguments` is called for every `hotswap` invocation, and
without `--ray` nothing of Ray is ever imported.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

log = logging.getLogger("hotswap.ray")


def add_ray_arguments(serve: argparse.ArgumentParser) -> None:
    ray = serve.add_argument_group("scale-out on Ray Serve (pip install 'hotswap[ray]'; docs/scale-out.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: one ingress (this API) in front of --replicas engine replicas, routed by adapter affinity")
    ray.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="the Ray cluster to join: auto (a `ray start` cluster on this machine), ray://HOST:10001, HOST:6379 "
                          "(without it: a Ray instance of its own for this process)")
    ray.add_argument("--replicas", type=_positive_int, default=1, help="engine replicas (with autoscaling: the initial number)")
    ray.add_argument("--min-replicas", type=_positive_int, default=None, help="autoscaling: fewest engine replicas")
    ray.add_argument("--max-replicas", type=_positive_int, default=None, help="autoscaling: most engine replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests in flight per replica that Ray Serve scales towards")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each engine replica (its torch threads too, on the CPU)")
    ray.add_argument("--max-adapters-per-replica", type=_positive_int, default=None,
                     help="Ray Serve's max_num_models_per_replica: adapters routed to one replica by affinity (without it: "
                          "what --adapter-memory-bytes holds of rank-16 LoRAs)")
    ray.add_argument("--max-ongoing-requests", type=_positive_int, default=None,
                     help="requests one engine replica takes at once (Serve's max_ongoing_requests; default: twice "
                          "--max-num-seqs); lower, an adapter's requests overflow to other replicas sooner")
    ray.add_argument("--ray-routing", choices=("affinity", "random"), default=None,
                     help="affinity (default): a registry adapter's requests go to a replica that holds it (Serve's model "
                          "multiplexing); random: to the less loaded of two replicas, whatever they hold (a baseline)")
    ray.add_argument("--ray-stream-interval-ms", type=float, default=None, metavar="MS",
                     help="a replica merges a stream's tokens that come within MS into one message to the ingress, after the "
                          "first (default: 50, as Ray Serve LLM; 0: one message per output)")
    ray.add_argument("--ray-app-name", default="hotswap", help="the Serve application's name")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_ray_arguments(args: argparse.Namespace) -> None:
    """Refuse Ray flags without --ray, and inconsistent ones (CliError), before anything starts."""
    from server.console import CliError

    given = [flag for flag, value in (("--ray-address", args.ray_address), ("--min-replicas", args.min_replicas),
                                      ("--max-replicas", args.max_replicas), ("--target-ongoing-requests", args.target_ongoing_requests),
                                      ("--max-adapters-per-replica", args.max_adapters_per_replica), ("--ray-routing", args.ray_routing), ("--max-ongoing-requests", args.max_ongoing_requests),
                                      ("--ray-stream-interval-ms", args.ray_stream_interval_ms)) if value is not None]  # fmt: skip
    if not args.ray:
        if given or args.replicas != 1:
            raise CliError(f"{(given or ['--replicas'])[0]} applies to serving on Ray Serve: add --ray")
        return
    if args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas:
        raise CliError(f"--min-replicas {args.min_replicas} is above --max-replicas {args.max_replicas}")
    if args.store.startswith("memory://"):
        raise CliError("--store memory:// lives in one process: with --ray every replica must open the same store (a directory or s3://)")
    if not args.replica_cpus > 0:
        raise CliError(f"--replica-cpus {args.replica_cpus}: give the CPUs each replica needs, more than 0")
    if args.ray_stream_interval_ms is not None and not 0 <= args.ray_stream_interval_ms < float("inf"):
        raise CliError("--ray-stream-interval-ms must be 0 or more")
    if args.target_ongoing_requests is not None and not args.target_ongoing_requests > 0:
        raise CliError("--target-ongoing-requests must be more than 0")


def serve_on_ray(args: argparse.Namespace, engine_config, model_dir: Path, limits) -> int:
    """Deploy on Ray Serve and serve until SIGINT/SIGTERM; then delete the application (open requests get
    --drain-seconds to finish) and, if this process started Ray, stop it."""
    from server.console import CliError

    try:
        import ray
    except ImportError:
        raise CliError("--ray needs Ray Serve: pip install 'hotswap[ray]'") from None
    from server.ray_serve.app import deploy, undeploy

    ray.init(address=args.ray_address, log_to_driver=True)
    started_here = args.ray_address is None
    try:
        replica, ingress, scale = ray_settings(args, engine_config, model_dir, limits, ray.cluster_resources())
        facts = deploy(replica, ingress, scale, name=args.ray_app_name, http_host=args.host, http_port=args.port)
        log.info("serving %s on http://%s:%d through Ray Serve: %s engine replica(s); Ctrl-C or SIGTERM stops it",
                 facts["model_name"], args.host, args.port, scale.autoscaling or scale.replicas)  # fmt: skip
        _wait_for_signal()
        log.info("stopping: deleting the Serve application (open requests get up to %g s)", args.drain_seconds)
        undeploy(args.ray_app_name)
    finally:
        if started_here:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    return 0


def ray_settings(args: argparse.Namespace, engine_config, model_dir: Path, limits, resources: dict, strict: bool = True):
    """(ReplicaSettings, IngressSettings, ScaleOut) from `hotswap serve --ray`'s flags. `resources`: the
    cluster's (ray.cluster_resources()); with strict=False (an autoscaling cluster that adds GPU nodes on
    demand) --device cuda is taken at its word."""
    from dataclasses import replace

    from server.ray_serve.app import ScaleOut, max_adapters_per_replica
    from server.ray_serve.ingress import IngressSettings
    from server.ray_serve.replica import ReplicaSettings

    gpus = _wants_gpus(args.device, resources, strict)
    # replicas run in other working directories: every path they open is made absolute
    engine_config = replace(engine_config, model=args.model.resolve() if args.model else None, device="cuda" if gpus else "cpu",
                            adapters={name: path.resolve() for name, path in engine_config.adapters.items()},
                            adapters_dir=args.adapters_dir.resolve() if args.adapters_dir else None)  # fmt: skip
    store = _absolute_store(args.store)
    cache_dir = args.cache_dir.resolve() if args.cache_dir else None
    lora_bytes = 4 if args.lora_dtype == "float32" else 2
    replica = ReplicaSettings(engine=engine_config, store=store, s3_endpoint=args.s3_endpoint, cache_dir=cache_dir,
                              disk_cache_bytes=args.disk_cache_bytes, host_adapter_bytes=args.host_adapter_bytes,
                              max_adapters=max_adapters_per_replica(model_dir, args.adapter_memory_bytes, lora_bytes), log_level=args.log_level)  # fmt: skip
    if args.ray_stream_interval_ms is not None:
        replica = replace(replica, stream_interval_s=args.ray_stream_interval_ms / 1000)
    ingress = IngressSettings(store=store, s3_endpoint=args.s3_endpoint, cache_dir=cache_dir, disk_cache_bytes=args.disk_cache_bytes,
                              admin_key=args.admin_key, limits=limits, enable_docs=args.enable_docs, log_level=args.log_level,
                              affinity=args.ray_routing != "random")  # fmt: skip
    scale = ScaleOut(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                     target_ongoing_requests=args.target_ongoing_requests, replica_cpus=args.replica_cpus, gpus=gpus,
                     max_adapters=args.max_adapters_per_replica, graceful_shutdown_s=args.drain_seconds,
                     max_ongoing_requests=args.max_ongoing_requests)  # fmt: skip
    return replica, ingress, scale


def _wants_gpus(device: str, resources: dict, strict: bool = True) -> bool:
    from server.console import CliError

    if device.startswith("cuda"):
        if strict and not resources.get("GPU"):
            raise CliError(f"--device {device}: the Ray cluster has no GPUs")
        return True
    return device == "auto" and bool(resources.get("GPU"))


def _absolute_store(store: str) -> str:
    """Replicas run in other working directories: a relative local store path is made absolute."""
    if "://" in store:
        return store
    return str(Path(store).resolve())


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
