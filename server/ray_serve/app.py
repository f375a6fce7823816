"""Deploying hotswap on Ray Serve: the board, then one Serve application of two deployments.

- `EngineReplica`: N replicas (or autoscaled), each with `num_cpus` (or one GPU) of its own, adapter
  affinity through model multiplexing; reached only through the ingress's DeploymentHandle.
- `HotswapIngress`: one replica on the HTTP route `/`, carrying the FastAPI app of `hotswap serve`. Its
  app is built when it starts, from the model facts an engine replica answers (limits, names, the model
  directory for the tokenizer), so that it validates requests exactly as `hotswap serve` does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from server.ray_serve.board import BOARD_NAMESPACE, board_name, open_board
from server.ray_serve.ingress import INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT, HotswapIngress, IngressSettings
from server.ray_serve.replica import EngineReplica, ReplicaSettings

log = logging.getLogger("hotswap.ray")

DEFAULT_APP = "hotswap"
REFERENCE_RANK = 16  # the LoRA rank that sizes max_num_models_per_replica from the device adapter budget
UNBOUNDED_MAX_ADAPTERS = 64  # max_num_models_per_replica when the adapter budget is unbounded
INGRESS_MAX_ONGOING = 4096  # requests the one ingress replica takes at once (they mostly wait on replicas)


@dataclass(frozen=True)
class ScaleOut:
    """How many engine replicas, what each one gets, and how Serve routes to them."""

    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    gpus: bool = False  # one GPU per replica
    max_adapters: int | None = None  # max_num_models_per_replica; None: from the adapter budget
    max_ongoing_requests: int | None = None  # per replica; None: twice the engine's max_num_seqs
    graceful_shutdown_s: float = 30.0
    health_check_period_s: float = 2.0
    extra_actor_options: dict = field(default_factory=dict)

    @property
    def autoscaling(self) -> dict | None:
        if self.min_replicas is None and self.max_replicas is None and self.target_ongoing_requests is None:
            return None
        config = {"min_replicas": self.min_replicas if self.min_replicas is not None else 1,
                  "max_replicas": self.max_replicas if self.max_replicas is not None else max(self.replicas, self.min_replicas or 1),
                  "initial_replicas": self.replicas}  # fmt: skip
        config["initial_replicas"] = min(max(config["initial_replicas"], config["min_replicas"]), config["max_replicas"])
        if self.target_ongoing_requests is not None:
            config["target_ongoing_requests"] = self.target_ongoing_requests
        return config

    def actor_options(self) -> dict:
        options = {"num_cpus": self.replica_cpus} | ({"num_gpus": 1} if self.gpus else {})
        return options | self.extra_actor_options


def max_adapters_per_replica(model_dir, adapter_memory_bytes: int | None, lora_bytes_per_value: int = 2) -> int:
    """How many adapters a replica's device pools hold: the budget over the bytes of a rank-16 LoRA on
    every projection (what the engine's pools spend on it), at least 1; UNBOUNDED_MAX_ADAPTERS without a
    budget. Ray Serve's max_num_models_per_replica, so that routing by affinity matches what fits."""
    from server.models.config import ModelConfig

    if adapter_memory_bytes is None:
        return UNBOUNDED_MAX_ADAPTERS
    c = ModelConfig.from_dir(model_dir)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    # (in + out) of q, k, v, o, gate, up, down: A is rank x in, B is out x rank
    per_rank = (c.hidden_size + q) * 2 + (c.hidden_size + kv) * 2 + (c.hidden_size + c.intermediate_size) * 3
    lora_bytes = per_rank * c.num_layers * REFERENCE_RANK * lora_bytes_per_value
    return max(1, adapter_memory_bytes // lora_bytes)


def build_application(replica: ReplicaSettings, ingress: IngressSettings, scale: ScaleOut, name: str = DEFAULT_APP):
    """The Serve application: the ingress bound to the engine replicas' deployment."""
    from ray import serve

    board = board_name(name)
    engine = replica.engine
    if engine.threads is None:  # torch's threads = the CPUs Ray gives the replica
        engine = replace(engine, threads=max(1, int(scale.replica_cpus)))
    max_adapters = scale.max_adapters or replica.max_adapters
    replica = replace(replica, engine=engine, board=board, max_adapters=max_adapters)
    autoscaling = scale.autoscaling
    sizing = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": scale.replicas}
    engines = serve.deployment(
        EngineReplica, name=REPLICA_DEPLOYMENT, ray_actor_options=scale.actor_options(), **sizing,
        max_ongoing_requests=scale.max_ongoing_requests or 2 * engine.max_num_seqs,
        health_check_period_s=scale.health_check_period_s, graceful_shutdown_timeout_s=scale.graceful_shutdown_s,
    )  # fmt: skip
    front = serve.deployment(
        serve.ingress()(HotswapIngress), name=INGRESS_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING, graceful_shutdown_timeout_s=scale.graceful_shutdown_s,
    )  # fmt: skip
    log.info("%s engine replica(s) (%s; up to %d adapters routed to each) behind one ingress",
             autoscaling or scale.replicas, scale.actor_options(), max_adapters)  # fmt: skip
    return front.bind(engines.bind(replica), replace(ingress, board=board))


def deploy(replica: ReplicaSettings, ingress: IngressSettings, scale: ScaleOut, name: str = DEFAULT_APP,
           http_host: str = "127.0.0.1", http_port: int = 8000) -> dict:  # fmt: skip
    """Deploy (or redeploy) on the Ray cluster this process is connected to (ray.init first). Blocks until
    the replicas and the ingress are up; returns the facts an engine replica answers."""
    from ray import serve

    open_board(board_name(name))
    serve.start(http_options={"host": http_host, "port": http_port})
    serve.run(build_application(replica, ingress, scale, name), name=name, route_prefix="/")
    return serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=name).facts.remote().result()


def app_builder(args: dict):
    """A Serve application builder, for `serve run server.ray_serve.app:app_builder replicas=2 store=s3://...`
    and a KubeRay RayService's `import_path` + `args`: the keys are `hotswap serve` flags without their
    dashes (`model`, `store`, `replicas`, `device`, `max_replicas`, ...; true for a flag without a value).
    The admin key comes from HOTSWAP_ADMIN_KEY where the builder runs; HTTP host and port are Serve's own
    (http_options), not --host/--port."""
    import ray

    from server.cli import _embedded_model_dir, build_parser, engine_config, request_limits
    from server.ray_serve.cli import check_ray_arguments, ray_settings

    argv = ["serve", "--ray"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (False, None):
            for v in value if isinstance(value, list) else [value]:
                argv += [flag, str(v)]
    parsed = build_parser().parse_args(argv)
    check_ray_arguments(parsed)
    model_dir = parsed.model if parsed.model is not None else _embedded_model_dir()
    replica, ingress, scale = ray_settings(parsed, engine_config(parsed), model_dir, request_limits(parsed), ray.cluster_resources(), strict=False)
    return build_application(replica, ingress, scale, parsed.ray_app_name)


def undeploy(name: str = DEFAULT_APP) -> None:
    """Delete the application and the board (the replicas finish their open requests first)."""
    import ray
    from ray import serve

    serve.delete(name)
    try:
        ray.kill(ray.get_actor(board_name(name), namespace=BOARD_NAMESPACE))
    except ValueError:  # no such actor: never created, or already gone
        pass
