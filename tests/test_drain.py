"""Graceful drain on SIGTERM: new requests are refused with 503 + Retry-After while open ones finish;
what still runs after --drain-seconds ends with a final error; the process exits 0.

The first two tests run a real server process each (as Kubernetes or Ray would signal it); the last
drives the engine side (AsyncEngine.fail_all) directly.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from contextlib import contextmanager

import httpx

from server.api.guard import SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE

MODEL = "SmolLM2-135M-Instruct"


@contextmanager
def server(model_dir, tmp_path, drain_seconds: float):
    from loadtests.servers import ServerProcess, free_port, hotswap_cmd

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--store", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), "--kv-cache-tokens", "4096",
             "--drain-seconds", str(drain_seconds)]
    with ServerProcess("hotswap", hotswap_cmd(port, model_dir, extra), url, tmp_path / "server.log", ready_path="/health", start_timeout=180) as proc:
        proc.url = url
        yield proc


class Stream(threading.Thread):
    """A streamed completion read line by line on its own thread."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.lines = url, []
        self.body = {"model": MODEL, "prompt": "Count to fifty:", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                     "stream_options": {"include_usage": True}}

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                self.lines.extend(line for line in r.iter_lines() if line)
        except Exception as e:  # noqa: BLE001 - the test reports it
            self.lines.append(repr(e))

    def wait_for_tokens(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.lines) < 3:
            assert time.time() < deadline and self.is_alive(), f"the stream did not start: {self.lines}"
            time.sleep(0.05)


def wait_until_draining(url: str) -> httpx.Response:
    deadline = time.time() + 10
    while (r := httpx.get(url + "/health")).json()["status"] != "draining":
        assert time.time() < deadline, r.text
        time.sleep(0.05)
    return r


def test_sigterm_refuses_new_requests_lets_open_streams_finish_and_exits_0(model_dir, tmp_path):
    with server(model_dir, tmp_path, drain_seconds=120) as proc:
        stream = Stream(proc.url, max_tokens=64)  # long enough to outlast the checks below
        stream.start()
        stream.wait_for_tokens()
        proc.proc.send_signal(signal.SIGTERM)
        health = wait_until_draining(proc.url)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert httpx.get(proc.url + "/metrics").status_code == 200  # still scraped
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/admin/v1/tenants")):
            r = httpx.request(method, proc.url + path, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2} if method == "POST" else None)
            assert r.status_code == 503, (path, r.text)
            assert int(r.headers["retry-after"]) > 0 and r.headers["connection"] == "close"
            assert r.json() == {"error": {"message": SHUTTING_DOWN_MESSAGE, "type": "service_unavailable", "param": None, "code": SHUTTING_DOWN}}
        assert stream.is_alive(), "the stream ended before the refusals were checked: make it longer"
        stream.join(timeout=120)
        assert proc.proc.wait(timeout=30) == 0
    lines = stream.lines
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    # every token was generated, most of them after SIGTERM (not every token makes a text chunk: one can
    # end inside a character, so the usage chunk counts them)
    assert chunks[-1]["usage"]["completion_tokens"] == 64
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_requests_still_running_after_drain_seconds_end_with_a_final_error_and_the_process_exits_0(model_dir, tmp_path):
    with server(model_dir, tmp_path, drain_seconds=1) as proc:
        stream = Stream(proc.url, max_tokens=1500)  # minutes of decoding on a CPU
        blocking: list[httpx.Response] = []
        body = {"model": MODEL, "prompt": "Tell a long story:", "max_tokens": 1500, "ignore_eos": True}
        collector = threading.Thread(target=lambda: blocking.append(httpx.post(proc.url + "/v1/completions", json=body, timeout=120)), daemon=True)
        stream.start()
        collector.start()
        stream.wait_for_tokens()
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=20) == 0
        exited_after = time.monotonic() - t0
        stream.join(timeout=10)
        collector.join(timeout=10)
    assert exited_after < 8, f"exited {exited_after:.1f} s after SIGTERM with --drain-seconds 1"
    assert stream.lines[-1] == "data: [DONE]"
    final = json.loads(stream.lines[-2][6:])
    assert final == {"error": {"message": SHUTTING_DOWN_MESSAGE, "type": "server_error", "param": None, "code": SHUTTING_DOWN}}
    assert len(stream.lines) < 1500  # ended early, not run to its length
    (r,) = blocking
    assert r.status_code == 503 and r.json()["error"]["code"] == SHUTTING_DOWN and int(r.headers["retry-after"]) > 0


def test_a_second_signal_ends_the_open_requests_at_once_and_exits_0(model_dir, tmp_path):
    with server(model_dir, tmp_path, drain_seconds=600) as proc:
        stream = Stream(proc.url, max_tokens=1500)
        stream.start()
        stream.wait_for_tokens()
        proc.proc.send_signal(signal.SIGTERM)
        wait_until_draining(proc.url)
        t0 = time.monotonic()
        proc.proc.send_signal(signal.SIGINT)  # Ctrl-C counts as well
        assert proc.proc.wait(timeout=20) == 0
        exited_after = time.monotonic() - t0
        stream.join(timeout=10)
    assert exited_after < 8, f"exited {exited_after:.1f} s after the second signal"
    assert stream.lines[-1] == "data: [DONE]" and json.loads(stream.lines[-2][6:])["error"]["code"] == SHUTTING_DOWN


def test_fail_all_ends_every_sequence_and_with_refuse_new_every_later_one(model_dir):
    from server.config import EngineConfig
    from server.engine.async_engine import AsyncEngine
    from server.engine.llm_engine import LLMEngine
    from server.engine.sequence import RequestFailed, SamplingParams, Sequence

    engine = LLMEngine(EngineConfig(quantization="none", model=model_dir, kv_cache_tokens=2048, served_model_name="smollm2", enforce_eager=True))
    async_engine = AsyncEngine(engine)
    prompt = engine.tokenizer("Count to fifty:")["input_ids"]

    def seq() -> Sequence:
        return Sequence(prompt, SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))

    async def outcome(s: Sequence, on_first_output=None) -> tuple[int, RequestFailed | None]:
        outputs = 0
        try:
            async for _ in async_engine.generate(s):
                outputs += 1
                if outputs == 1 and on_first_output is not None:
                    on_first_output()
        except RequestFailed as e:
            return outputs, e
        return outputs, None

    async def run():
        shutdown = RequestFailed(SHUTTING_DOWN_MESSAGE, status=503, code=SHUTTING_DOWN)
        # the first one's first output fails both: they are decoding in the engine then
        first = asyncio.ensure_future(outcome(seq(), on_first_output=lambda: async_engine.fail_all(shutdown, refuse_new=True)))
        second = asyncio.ensure_future(outcome(seq()))
        ended = await asyncio.wait_for(asyncio.gather(first, second), 60)
        later = await asyncio.wait_for(outcome(seq()), 10)
        return ended, later

    async_engine.start()
    try:
        ended, later = asyncio.run(run())
    finally:
        async_engine.stop()
    for outputs, error in [*ended, later]:
        assert error is not None and (error.status, error.code, str(error)) == (503, SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        assert outputs < 50
    assert later[0] == 0  # refused before it produced anything
    assert async_engine.sequences_in_flight == 0 and not engine.has_work()


def test_drain_seconds_is_documented_and_a_negative_one_is_one_line():
    import subprocess
    import sys

    def hotswap(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], capture_output=True, text=True, timeout=60)

    assert "--drain-seconds" in hotswap("--help").stdout
    refused = hotswap("--drain-seconds", "-1")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "hotswap: error: --drain-seconds -1.0: give the seconds open requests may run on after SIGTERM, 0 or more"]
