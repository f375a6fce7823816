"""A hotswap server as an attacker meets it, and the watchers that prove an attack hurt nobody else.

`hostile_server(...)` starts a real `hotswap serve` process (the admin key from HOTSWAP_ADMIN_KEY, as
the README tells operators) on a real SeaweedFS S3 store, with two tenants, each with its own key
and adapter. While attacks run:
- `HealthWatch` polls the public /health on its own connection and records every answer slower
  than a second or other than 200;
- `Witness` streams greedy completions for the other tenant and records any whose text differs
  from the one it got before the attacks began.
"""
from __future__ import annotations

import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

from loadtests.servers import ServerProcess, free_port, hotswap_cmd
from tests.s3_server import SeaweedS3

TENANTS = {"acme": ("support", "r8-all"), "globex": ("legal", "r4-qv")}  # tenant -> (adapter name, which test adapter)
WITNESS_PROMPT = "The three primary colors are"
MAX_ADAPTER_BYTES = 16 * 2**20  # the test adapters are under 10 MiB


@dataclass
class HostileServer:
    url: str
    admin_key: str = field(repr=False)  # kept out of pytest's failure reports
    keys: dict[str, str] = field(repr=False)  # tenant -> API key
    s3: SeaweedS3
    process: ServerProcess
    log_path: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=60)

    def tenant(self, name: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys[name]}"}, timeout=60)

    def openai(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[tenant], max_retries=0, timeout=60)

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def hostile_server(model_dir: Path, adapter_dirs: dict[str, Path], workdir: Path, extra_args: tuple[str, ...] = ()):
    admin_key = "adm-" + secrets.token_urlsafe(24)
    with SeaweedS3() as s3:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        args = ["--store", f"s3://{s3.bucket}/hostile", "--s3-endpoint", s3.endpoint, "--cache-dir", str(workdir / "cache"),
                "--kv-cache-tokens", "8192", "--max-lora-rank", "32", "--max-adapter-bytes", str(MAX_ADAPTER_BYTES),
                "--log-level", "warning", *HOSTILE_ENGINE_ARGS, *extra_args]
        env = {"HOTSWAP_ADMIN_KEY": admin_key, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_REGION": "us-east-1"}
        log_path = workdir / "server.log"
        with ServerProcess("hotswap", hotswap_cmd(port, model_dir, args), url, log_path, env=env, ready_path="/health", start_timeout=180) as proc:
            server = HostileServer(url, admin_key, {}, s3, proc, log_path)
            with server.admin() as admin:
                for tenant, (name, source) in TENANTS.items():
                    assert admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
                    server.keys[tenant] = admin.post(f"/admin/v1/tenants/{tenant}/keys").json()["key"]
                    files = {f: (f, (adapter_dirs[source] / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
                    r = admin.post("/admin/v1/adapters", data={"tenant": tenant, "name": name}, files=files)
                    assert r.status_code == 201, r.text
            yield server


@dataclass
class HealthWatch:
    """Polls /health every `interval` seconds on its own connection for as long as it runs."""

    url: str
    interval: float = 0.25
    limit_s: float = 1.0
    slowest: float = 0.0
    polls: int = 0
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get(self.url + "/health").status_code
                except httpx.HTTPError as e:
                    status = f"{type(e).__name__}"
                took = time.perf_counter() - t0
                self.polls += 1
                self.slowest = max(self.slowest, took)
                if status != 200 or took > self.limit_s:
                    self.failures.append(f"/health -> {status} in {took:.2f} s")
                self._stop.wait(self.interval)


# How far a witness token's logprob may move, and how close a tie must be for its greedy token to flip,
# before the change counts as harm. The server runs float32 (HOSTILE_ENGINE_ARGS), where another
# request in the step changes only the order of float sums (GEMM blocking over more rows, the compiled
# step's batch-size variants): ~1e-5. Corruption (another row's numbers, mask or adapter leaking in)
# moves logprobs by far more. (A quantized base would not do here: w8a8 and int8 pick their GEMM kernel
# by the step's row count, kernels/w8a8.py, and the two round activations differently, ~0.2 nats:
# a documented batch dependence, not a leak.)
LOGPROB_DRIFT = 0.02
TIE_MARGIN = 0.02
HOSTILE_ENGINE_ARGS = ("--quantization", "none", "--lora-dtype", "float32")


@dataclass
class Witness:
    """Another tenant streams greedy completions all along; each must say what it said first, up to the
    rounding another request's presence may cause: the same tokens with logprobs within LOGPROB_DRIFT, or
    a first different token that was within TIE_MARGIN of the reference's at that point (a near tie)."""

    server: HostileServer
    tenant: str = "globex"
    max_tokens: int = 12
    runs: int = 0
    flips: int = 0  # runs that diverged at a near tie (allowed)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = self.server.openai(self.tenant)
        self.reference = self._once()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="witness", daemon=True)

    def _once(self) -> list[tuple[str, float, dict[str, float]]]:
        """(token, logprob, top-2 logprobs) per generated token."""
        model = TENANTS[self.tenant][0]
        stream = self.client.completions.create(model=model, prompt=WITNESS_PROMPT, max_tokens=self.max_tokens, temperature=0, stream=True,
                                                logprobs=2)  # fmt: skip
        out = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].logprobs is not None:
                lp = chunk.choices[0].logprobs
                out += list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        return out

    def harm(self, run: list[tuple[str, float, dict[str, float]]]) -> str | None:
        """Why `run` differs from the reference by more than rounding, or None."""
        ref = self.reference
        text = lambda tokens: "".join(t for t, _, _ in tokens)  # noqa: E731
        for k, ((tok, lp, _), (rtok, rlp, rtop)) in enumerate(zip(run, ref)):
            if tok != rtok:
                if tok in rtop and rlp - rtop[tok] <= TIE_MARGIN:
                    self.flips += 1
                    return None
                return f"text changed at token {k}: {text(run)!r} != {text(ref)!r} (not a near tie: {rtop})"
            if abs(lp - rlp) > LOGPROB_DRIFT:
                return f"logprob of token {k} ({tok!r}) moved from {rlp:.4f} to {lp:.4f}"
        if len(run) != len(ref):
            return f"{len(run)} tokens instead of {len(ref)}: {text(run)!r} != {text(ref)!r}"
        return None

    def __enter__(self) -> "Witness":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                run = self._once()
            except openai.OpenAIError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                continue
            self.runs += 1
            if (why := self.harm(run)) is not None:
                self.failures.append(why)
