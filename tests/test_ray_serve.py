"""hotswap on Ray Serve (server/ray_serve): one ingress, two engine replicas, one registry, over real HTTP.

A local Ray instance of 2 CPUs started here; two small replicas (eager, float32, a small KV cache) and
the registry on a temporary directory with an admin key and two tenants. Through the `openai` SDK:
greedy tokens equal an in-process engine's; adapter affinity by the replica header; uploads, new
versions and deletes through the ingress; tenant isolation; and a replica killed mid-stream.
"""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hotswap[ray]')")
serve = pytest.importorskip("ray.serve")

from loadtests.servers import free_port  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.ray_serve.wire import REPLICA_HEADER  # noqa: E402
from tests.conftest import greedy_outputs  # noqa: E402

ADMIN = "ray-admin-key"
PROMPT = "The capital of France is"
APP = "hotswap-test"


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Ray with 2 CPUs, two engine replicas of 1 CPU each, the ingress on a free loopback port."""
    from server.api.limits import RequestLimits
    from server.ray_serve.app import ScaleOut, deploy, undeploy
    from server.ray_serve.ingress import IngressSettings
    from server.ray_serve.replica import ReplicaSettings

    root = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="hotswap-tests")
    store, cache = str(root / "store"), root / "cache"
    engine = EngineConfig(model=model_dir, served_model_name="smollm2", quantization="none", lora_dtype="float32", enforce_eager=True,
                          kv_cache_tokens=2048, max_num_seqs=8, max_lora_rank=32, adapter_memory_bytes=64 * 2**20)  # fmt: skip
    replica = ReplicaSettings(engine=engine, store=store, cache_dir=cache, disk_cache_bytes=1 << 30, host_adapter_bytes=1 << 30, max_adapters=4)
    ingress = IngressSettings(store=store, cache_dir=cache, admin_key=ADMIN,
                              limits=RequestLimits(max_adapter_bytes=24 * 2**20))  # fmt: skip
    port = free_port()
    try:
        deploy(replica, ingress, ScaleOut(replicas=2, replica_cpus=1, graceful_shutdown_s=1, health_check_period_s=1), name=APP, http_port=port)
        c = _Cluster(f"http://127.0.0.1:{port}")
        for tenant in ("acme", "globex"):
            assert c.admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
        c.keys = {t: c.admin.post(f"/admin/v1/tenants/{t}/keys").json()["key"] for t in ("acme", "globex")}
        c.wait_until(lambda: len(c.ready_replicas()) == 2, "both replicas report to the board")
        yield c
    finally:
        undeploy(APP)
        serve.shutdown()
        ray.shutdown()


class _Cluster:
    def __init__(self, base_url: str):
        self.base_url = base_url
        self.admin = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        self.keys: dict[str, str] = {}

    def client(self, tenant: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.keys[tenant] if tenant else ADMIN, max_retries=0, timeout=120)

    def health(self) -> dict:
        return self.admin.get("/health").json()

    def ready_replicas(self) -> dict[str, dict]:
        return {rid: r for rid, r in self.health().get("replicas", {}).items() if r["state"] == "ready"}

    def upload(self, tenant: str, name: str, adapter_dir, **fields) -> dict:
        files = {n: (n, (adapter_dir / n).read_bytes()) for n in ("adapter_config.json", "adapter_model.safetensors")}
        data = {"tenant": tenant, "name": name, **{k: str(v).lower() for k, v in fields.items()}}
        r = self.admin.post("/admin/v1/adapters", data=data, files=files)
        assert r.status_code == 201, r.text
        return r.json()

    @staticmethod
    def wait_until(check, what: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting until {what}")
            time.sleep(0.5)


def greedy(client: openai.OpenAI, model: str, n: int = 12) -> tuple[str, str]:
    """(text, the replica header) of a greedy completion."""
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0)
    return raw.parse().choices[0].text, raw.headers.get(REPLICA_HEADER)


_LOCAL: dict[tuple[str | None, int], str] = {}


def local_text(engine, adapter: str | None, n: int = 12) -> str:
    """What the in-process engine generates greedily (the same weights, one process), up to EOS."""
    if (adapter, n) not in _LOCAL:
        ids = greedy_outputs(engine, [(PROMPT, adapter)], n)[0]
        eos = engine.eos_token_ids
        ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
        _LOCAL[(adapter, n)] = engine.tokenizer.decode(ids, skip_special_tokens=True)
    return _LOCAL[(adapter, n)]


def test_completion_chat_and_stream_through_the_ingress_equal_an_in_process_engine(cluster, engine):
    admin = cluster.client()
    text, replica = greedy(admin, "smollm2")
    assert text == local_text(engine, None)
    assert replica in cluster.ready_replicas()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = admin.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0)
    chunks = list(admin.chat.completions.create(model="smollm2", messages=messages, max_tokens=10, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # structured output crosses as a spec the replica compiles; logprobs come back with the tokens
    guided = admin.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                      extra_body={"guided_choice": ["Paris", "Lyon"]})  # fmt: skip
    assert guided.choices[0].text in ("Paris", "Lyon") and len(guided.choices[0].logprobs.tokens) >= 1
    with httpx.stream("POST", cluster.base_url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": "smollm2", "prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] in cluster.ready_replicas()
        assert r.read().decode().rstrip().endswith("data: [DONE]")


def test_errors_keep_their_statuses_and_the_admin_api_its_key(cluster):
    admin = cluster.client()
    with pytest.raises(openai.NotFoundError):
        admin.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        admin.completions.create(model="smollm2", prompt="word " * 3000, max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    tenant_on_admin = httpx.get(cluster.base_url + "/admin/v1/adapters", headers={"Authorization": f"Bearer {cluster.keys['acme']}"})
    assert tenant_on_admin.status_code == 401
    assert httpx.get(cluster.base_url + "/health").json() == {"status": "ready"}  # the public view names nothing


def test_requests_for_an_adapter_stay_on_the_replica_that_loaded_it(cluster, adapter_dirs, engine):
    cluster.upload("acme", "affine-a", adapter_dirs["r8-all"])
    cluster.upload("acme", "affine-b", adapter_dirs["r4-qv"])
    acme = cluster.client("acme")
    placed = {}
    for model, static in (("affine-a", "r8-all"), ("affine-b", "r4-qv")):
        seen = set()
        for _ in range(4):
            text, replica = greedy(acme, model)
            assert text == local_text(engine, static)
            seen.add(replica)
        assert len(seen) == 1, f"{model} was served by {seen}"
        placed[model] = seen.pop()
    # a new adapter goes to the replica holding fewer: both replicas serve
    assert set(placed.values()) == set(cluster.ready_replicas()), placed
    # the replicas report what they hold; /metrics has them per replica and summed
    cluster.wait_until(lambda: all(r["adapters_routed"] >= 1 for r in cluster.ready_replicas().values()), "the replicas report their adapters")
    metrics = cluster.admin.get("/metrics").text
    assert all(f'hotswap_replica_up{{replica="{rid}"}} 1.0' in metrics for rid in placed.values())
    residency = cluster.admin.get("/admin/v1/adapters/acme/affine-a").json()
    assert residency["residency"]["device"] is True


def test_upload_new_version_and_delete_through_the_ingress_reach_every_replica(cluster, adapter_dirs, engine):
    acme = cluster.client("acme")
    cluster.upload("acme", "versioned", adapter_dirs["r4-qv"])
    assert greedy(acme, "versioned")[0] == local_text(engine, "r4-qv")
    m = cluster.upload("acme", "versioned", adapter_dirs["r2-mlp"], new_version=True)
    assert m["version"] == 2
    # the request carries the version the ingress resolved: v2 at once, never the v1 a replica holds
    assert greedy(acme, "versioned")[0] == local_text(engine, "r2-mlp")
    assert cluster.admin.delete("/admin/v1/adapters/acme/versioned").status_code == 200
    for _ in range(4):
        with pytest.raises(openai.NotFoundError):
            acme.completions.create(model="versioned", prompt="hi", max_tokens=2)
    # the same name uploaded again starts at v1 with other contents: served as the new contents
    cluster.upload("acme", "versioned", adapter_dirs["r8-all"])
    assert greedy(acme, "versioned")[0] == local_text(engine, "r8-all")


def test_merged_adapters_are_built_on_a_replica_and_dropped_with_a_member(cluster, adapter_dirs):
    cluster.upload("acme", "merge-a", adapter_dirs["r8-all"])
    cluster.upload("acme", "merge-b", adapter_dirs["r4-qv"])
    acme = cluster.client("acme")

    def merged(members):
        raw = acme.completions.with_raw_response.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                                        extra_body={"adapters": members})  # fmt: skip
        return raw.parse().choices[0].text, raw.headers.get(REPLICA_HEADER)

    a, b = {"model": "merge-a", "weight": 0.7}, {"model": "merge-b", "weight": 0.3}
    text, replica = merged([a, b])
    assert text and replica in cluster.ready_replicas()
    assert merged([b, a])[0] == text  # one canonical stack, whichever replica builds it (exactness: tests/test_multi_adapter.py)
    assert cluster.admin.delete("/admin/v1/adapters/acme/merge-b").status_code == 200
    with pytest.raises(openai.NotFoundError) as gone:
        merged([a, b])
    assert gone.value.body["param"] == "adapters.1.model"


def test_a_client_that_hangs_up_frees_its_sequence_on_the_replica(cluster):
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    running = lambda: sum(r["running"] for r in cluster.ready_replicas().values())  # noqa: E731
    seen, checked = False, 0.0
    with httpx.stream("POST", cluster.base_url + "/v1/completions", headers={"Authorization": f"Bearer {ADMIN}"}, json=body, timeout=60) as r:
        deadline = time.monotonic() + 10
        for _ in r.iter_lines():  # 400 tokens take ~15 s: read on until a replica reports the sequence running
            if time.monotonic() - checked > 0.3:
                checked = time.monotonic()
                if running() == 1:
                    seen = True
                    break
            if checked > deadline:
                break
    assert seen, "no replica reported the sequence running"
    # hung up: the abort reaches the replica's engine, and its next report says so
    cluster.wait_until(lambda: running() == 0, "the replica aborts it", timeout=8)


def test_pins_reach_every_replica_through_the_board(cluster, adapter_dirs):
    cluster.upload("acme", "pinned", adapter_dirs["r16-attn"])
    assert cluster.admin.post("/admin/v1/adapters/acme/pinned/pin").status_code == 200
    key = "acme/pinned@v1"
    cluster.wait_until(lambda: all(key in r["pinned"] for r in cluster.ready_replicas().values()), "every replica pins it")
    detail = cluster.admin.get("/admin/v1/adapters/acme/pinned").json()
    assert detail["pinned"] is True and detail["residency"]["device"] is True
    assert cluster.admin.post("/admin/v1/adapters/acme/pinned/unpin").status_code == 200
    cluster.wait_until(lambda: not any(key in r["pinned"] for r in cluster.ready_replicas().values()), "every replica unpins it")
    assert cluster.admin.get("/admin/v1/adapters/acme/pinned").json()["pinned"] is False


def test_tenants_see_only_their_own_adapters(cluster, adapter_dirs):
    cluster.upload("acme", "private", adapter_dirs["r2-mlp"])
    globex = cluster.client("globex")
    with pytest.raises(openai.NotFoundError) as hidden:
        globex.completions.create(model="acme/private", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        globex.completions.create(model="acme/none-such", prompt="hi", max_tokens=2)
    assert hidden.value.body["message"].replace("private", "X") == missing.value.body["message"].replace("none-such", "X")
    assert "acme/private" not in {m.id for m in globex.models.list().data}
    assert greedy(cluster.client("acme"), "private")[0]


def test_a_replica_killed_mid_stream_fails_that_stream_retryably_and_the_app_recovers(cluster, adapter_dirs):
    cluster.upload("acme", "doomed", adapter_dirs["r12-ko"])
    acme = cluster.client("acme")
    _, victim = greedy(acme, "doomed")
    actor = cluster.ready_replicas()[victim]["actor"]
    stream = acme.completions.create(model="doomed", prompt=PROMPT, max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True})
    received = []
    with pytest.raises(openai.APIError) as lost:
        for chunk in stream:
            received.append(chunk.choices[0].text)
            if len(received) == 3:
                ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
    assert len(received) >= 3
    assert lost.value.code == "replica_unavailable" and "retry" in lost.value.message  # in-band: the status line went out long ago
    # the next requests find a live replica (routing again when the dead one is picked first)
    text, replica = greedy(acme, "doomed")
    assert text and replica != victim
    assert greedy(acme, "smollm2")[0]
    # Ray Serve replaces the dead replica; it reports in and serves
    cluster.wait_until(lambda: len(cluster.ready_replicas()) == 2 and victim not in cluster.ready_replicas(), "a new replica replaces the killed one",
                       timeout=120)  # fmt: skip
    assert {greedy(acme, "smollm2")[1] for _ in range(6)} <= set(cluster.ready_replicas())


def test_the_application_builder_takes_the_serve_flags(cluster, model_dir, tmp_path):
    """`serve run server.ray_serve.app:app_builder ...` and a KubeRay RayService build the app from a dict."""
    from ray.serve import Application

    from server.console import CliError
    from server.ray_serve.app import app_builder

    app = app_builder({"model": str(model_dir), "store": str(tmp_path / "store"), "replicas": 3, "device": "cuda", "max_replicas": 4,
                       "enforce_eager": True, "adapter": ["a=/x", "b=/y"]})  # fmt: skip
    assert isinstance(app, Application)
    with pytest.raises(CliError, match="every replica must open the same store"):  # refused as on the command line
        app_builder({"store": "memory://"})


def test_routing_stream_and_queue_flags_reach_the_deployment_settings(model_dir, tmp_path):
    from server.cli import build_parser, engine_config, request_limits
    from server.ray_serve.cli import ray_settings

    args = build_parser().parse_args(["serve", "--ray", "--model", str(model_dir), "--store", str(tmp_path), "--ray-routing", "random",
                                      "--ray-stream-interval-ms", "20", "--max-ongoing-requests", "8"])  # fmt: skip
    replica, ingress, scale = ray_settings(args, engine_config(args), model_dir, request_limits(args), {"CPU": 2.0})
    assert (ingress.affinity, replica.stream_interval_s, scale.max_ongoing_requests) == (False, 0.02, 8)
    args = build_parser().parse_args(["serve", "--ray", "--model", str(model_dir), "--store", str(tmp_path)])
    replica, ingress, scale = ray_settings(args, engine_config(args), model_dir, request_limits(args), {"CPU": 2.0})
    assert (ingress.affinity, replica.stream_interval_s, scale.max_ongoing_requests) == (True, 0.05, None)


# -- the ingress's client on its own, with a stand-in for the DeploymentHandle: retries are decided here ---------
class _Stream:
    """One call's response stream: its items, or an exception raised after `fail_after` of them."""

    def __init__(self, items, fail_after=None, error=None):
        self.items, self.fail_after, self.error = list(items), fail_after, error
        self.cancelled = False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for i, item in enumerate(self.items):
            if i == self.fail_after:
                raise self.error
            yield item
        if self.fail_after is not None and self.fail_after >= len(self.items):
            raise self.error

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, streams):
        self.streams, self.calls = list(streams), []
        self.generate = self

    def options(self, **options):
        self.calls.append(options)
        return self

    def remote(self, spec):
        return self.streams.pop(0)


def _remote_client(model_dir, handle, affinity=True):
    from server.engine.client import EngineLimits
    from server.ray_serve.remote_client import RemoteEngineClient

    limits = EngineLimits(max_model_len=2048, max_num_seqs=8, kv_cache_tokens=2048, vocab_size=49152, max_lora_rank=32, max_chars_per_token=64)
    facts = {"model_name": "smollm2", "model_dir": str(model_dir), "limits": limits, "static_adapters": [], "base_fingerprint": "x", "describe": {}}
    return RemoteEngineClient(handle, board=None, facts=facts, affinity=affinity)


def _outputs(client, seq):
    import asyncio

    from server.ray_serve.remote_client import SERVED_BY

    async def run():
        served: list[str] = []
        SERVED_BY.set(served)
        return [o async for o in client.generate(seq)], served

    return asyncio.run(run())


def _seq(manifest=None):
    from server.engine.client import SamplingParams, Sequence
    from server.ray_serve.wire import RemoteAdapter

    return Sequence([1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0), "t/a@v1" if manifest else None,
                    adapter_weights=RemoteAdapter(manifest) if manifest else None, tenant="t")  # fmt: skip


def _progress(text, finished=False, n=1):
    from server.engine.client import RequestOutput
    from server.ray_serve.wire import Progress

    return Progress(RequestOutput(text, [7], finished, "length" if finished else None, 3, n), queue_s=0.25, num_cached_tokens=0)


def test_a_replica_lost_before_it_streamed_is_routed_again(model_dir):
    from ray.exceptions import ActorDiedError

    from server.ray_serve.wire import Started

    dead = _Stream([Started("r1")], fail_after=1, error=ActorDiedError())
    alive = _Stream([Started("r2"), _progress("Paris"), _progress(".", finished=True, n=2)])
    handle = _Handle([dead, alive])
    seq = _seq()
    outs, served = _outputs(_remote_client(model_dir, handle), seq)
    assert [o.text for o in outs] == ["Paris", "."] and served == ["r1", "r2"]
    assert not alive.cancelled and handle.calls == [{"stream": True, "multiplexed_model_id": ""}]
    assert seq.first_scheduled_time == pytest.approx(seq.arrival_time + 0.25)  # the replica's queue time, for the metrics


def test_a_request_left_early_is_cancelled_on_its_replica(model_dir):
    import asyncio

    from server.ray_serve.wire import Started

    stream = _Stream([Started("r1"), _progress("Par"), _progress("is"), _progress(".", finished=True, n=3)])
    client = _remote_client(model_dir, _Handle([stream]))

    async def first_only():
        outputs = client.generate(_seq())
        first = await outputs.__anext__()
        await outputs.aclose()  # what the serving layer does when the client hangs up
        return first

    assert asyncio.run(first_only()).text == "Par" and stream.cancelled and client.sequences_in_flight == 0


def test_a_replica_lost_after_it_streamed_fails_the_request_with_a_retryable_503(model_dir):
    from ray.exceptions import ActorDiedError

    from server.engine.client import RequestFailed
    from server.ray_serve.wire import Started

    handle = _Handle([_Stream([Started("r1"), _progress("Par")], fail_after=2, error=ActorDiedError())])
    with pytest.raises(RequestFailed) as lost:
        _outputs(_remote_client(model_dir, handle), _seq())
    assert (lost.value.status, lost.value.code) == (503, "replica_unavailable") and not handle.streams


def test_requests_route_on_the_adapter_identity_and_replica_errors_keep_their_status(model_dir):
    from adapters_store import AdapterManifest
    from server.engine.client import RequestFailed
    from server.ray_serve.wire import Failed, Started

    manifest = AdapterManifest.build(tenant="t", name="a", version=3, files={"f": b"x"}, family="reclora", base_model="x", ranks={}, target_modules=[])
    handle = _Handle([_Stream([Started("r1"), Failed(400, "invalid_request_error", "the user's state does not fit")])])
    with pytest.raises(RequestFailed) as failed:
        _outputs(_remote_client(model_dir, handle), _seq(manifest))
    assert handle.calls == [{"stream": True, "multiplexed_model_id": "t/a@v3"}]
    assert (failed.value.status, str(failed.value)) == (400, "the user's state does not fit")

    # --ray-routing random: Serve picks the replica by load alone; the replica still loads what the spec names
    handle = _Handle([_Stream([Started("r2"), _progress(".", finished=True)])])
    assert [o.text for o in _outputs(_remote_client(model_dir, handle, affinity=False), _seq(manifest))[0]] == ["."]
    assert handle.calls == [{"stream": True, "multiplexed_model_id": ""}]


def test_without_ray_flag_nothing_imports_ray():
    code = ("import sys; from server.cli import build_parser; build_parser().parse_args(['serve']); import server.api.app, server.ray_serve.cli; "
            "print('ray' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "2"], "--replicas applies to serving on Ray Serve: add --ray"),
    (["--ray-address", "auto"], "--ray-address applies to serving on Ray Serve: add --ray"),
    (["--ray", "--store", "memory://"], "every replica must open the same store"),
    (["--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is above --max-replicas 2"),
    (["--ray-routing", "random"], "--ray-routing applies to serving on Ray Serve: add --ray"),
    (["--max-ongoing-requests", "8"], "--max-ongoing-requests applies to serving on Ray Serve: add --ray"),
    (["--ray", "--ray-stream-interval-ms", "-1"], "--ray-stream-interval-ms must be 0 or more"),
])
def test_ray_flags_are_checked_in_one_line_before_anything_starts(argv, message, capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", *argv])
    assert str(done.value).startswith("hotswap: error: ") and message in str(done.value)
