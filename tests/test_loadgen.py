"""loadtests/loadgen.py against the live hotswap server, plus its pure helpers."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from loadtests.loadgen import LoadSpec, adapter_names, parse_length, parse_popularity, poisson_arrivals, run_load
from tests.conftest import free_port

ADAPTERS = ["r4-qv", "r16-attn", "r32-q"]


def _run(spec: LoadSpec):
    return asyncio.run(run_load(spec))


def _spec(live_server, tmp_path, popularity: str, **kw) -> LoadSpec:
    base = dict(base_url=live_server.base_url, adapters=ADAPTERS, popularity=popularity, concurrency=3, requests=6,
                prompt_len="uniform:6-10", output_len="fixed:4", seed=1, progress=False,
                out_dir=str(tmp_path), name=popularity.replace(":", "_"))
    base.update(kw)
    return LoadSpec(**base)


def _check_ok(result, n: int, max_tokens: int = 4) -> None:
    s = result.summary
    assert s["requests"] == n and s["ok"] == n and s["errors"] == 0, s
    for r in result.records:
        assert r["ttft"] is not None and 0 < r["ttft"] <= r["latency"]
        assert r["output_tokens"] == max_tokens  # ignore_eos: the server produced every token
        assert r["usage_tokens"] == max_tokens
        assert r["tpot"] is not None and r["tpot"] > 0
    assert s["requests_per_s"] > 0 and s["output_tokens_per_s"] > 0
    assert s["ttft_s"]["p50"] <= s["latency_s"]["p99"]


@pytest.mark.parametrize("popularity", ["distinct", "identical", "uniform", "zipf:1.1", "base"])
def test_popularity_modes_against_live_server(live_server, tmp_path, popularity):
    n = 3 if popularity == "distinct" else 6
    result = _run(_spec(live_server, tmp_path, popularity, requests=n))
    _check_ok(result, n)
    per_model = result.summary["requests_per_model"]
    assert sum(per_model.values()) == n
    if popularity == "distinct":
        assert sorted(per_model) == sorted(ADAPTERS) and set(per_model.values()) == {1}
    elif popularity == "identical":
        assert per_model == {ADAPTERS[0]: n}
    elif popularity == "base":
        assert per_model == {"smollm2": n}  # the first id of /v1/models
    else:
        assert set(per_model) <= set(ADAPTERS)
    # files: JSON with config/summary/records, and a PNG
    doc = json.loads((tmp_path / f"{result.config['name']}.json").read_text())
    assert doc["summary"]["ok"] == n and len(doc["records"]) == n and doc["config"]["popularity"] == popularity
    png = (tmp_path / f"{result.config['name']}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_open_loop_and_injected_disconnects(live_server, tmp_path):
    result = _run(_spec(live_server, tmp_path, "uniform", concurrency=None, rate=30.0, requests=5, out_dir=None))
    _check_ok(result, 5)
    # every client hangs up early: counted as injected, never as errors
    result = _run(_spec(live_server, tmp_path, "uniform", requests=4, output_len="fixed:8", disconnect_prob=1.0, out_dir=None))
    s = result.summary
    assert s["disconnected_injected"] == 4 and s["errors"] == 0 and s["ok"] == 0, s
    assert all(1 <= r["chunks"] < 8 for r in result.records)
    # the server is fine afterwards
    _check_ok(_run(_spec(live_server, tmp_path, "identical", requests=2, out_dir=None)), 2)


def test_same_seed_same_plan():
    from loadtests.loadgen import _Plan

    def plan(seed):
        p = _Plan(LoadSpec(base_url="http://x", adapters=[f"a{i}" for i in range(50)], popularity="zipf:1.1", concurrency=1,
                           requests=200, prompt_len="uniform:5-20", seed=seed), None)
        return [p.item(i) for i in range(200)]

    a, b, c = plan(3), plan(3), plan(4)
    assert a == b and a != c
    counts = {}
    for it in a:
        counts[it["model"]] = counts.get(it["model"], 0) + 1
        assert 5 <= it["prompt_words"] <= 20 and len(it["prompt"].split()) == it["prompt_words"]
    assert counts["a0"] == max(counts.values())  # Zipf: rank 1 is the most popular


def test_unknown_adapter_is_an_http_error_by_type(live_server):
    result = _run(LoadSpec(base_url=live_server.base_url, adapters=["no-such-adapter"], popularity="identical",
                           concurrency=2, requests=3, output_len="fixed:2", progress=False))
    assert result.summary["errors_by_type"] == {"HTTP 404": 3}


def test_unreachable_url_reports_errors_not_crash(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = _run(LoadSpec(base_url=url, adapters=["x"], popularity="identical", concurrency=2, requests=4,
                           progress=False, timeout=5, out_dir=str(tmp_path), name="down"))
    s = result.summary
    assert s["requests"] == 4 and s["ok"] == 0 and s["errors"] == 4
    assert s["errors_by_type"] == {"ConnectError": 4}
    assert (tmp_path / "down.json").is_file() and (tmp_path / "down.png").is_file()
    # base mode resolves the model through /v1/models: unreachable too, still no crash
    result = _run(LoadSpec(base_url=url, popularity="base", rate=50.0, requests=2, progress=False, timeout=5))
    assert result.summary["errors_by_type"] == {"ConnectError": 2}


def test_poisson_interarrival_mean():
    rng = np.random.default_rng(0)
    t = poisson_arrivals(4.0, 40_000, rng)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps > 0) and np.all(np.diff(t) > 0)
    assert abs(gaps.mean() - 0.25) < 0.25 * 0.02
    assert abs(gaps.std() - 0.25) < 0.25 * 0.03  # exponential: std == mean
    with pytest.raises(ValueError):
        poisson_arrivals(0, 3, rng)


def test_parsers():
    assert parse_length("fixed:7") == (7, 7) and parse_length("uniform:3-9") == (3, 9)
    for bad in ("fixed:0", "uniform:9-3", "normal:4", "fixed:x"):
        with pytest.raises(ValueError):
            parse_length(bad)
    assert parse_popularity("zipf:1.1") == ("zipf", 1.1) and parse_popularity("distinct") == ("distinct", 0.0)
    with pytest.raises(ValueError):
        parse_popularity("pareto:2")
    assert adapter_names("a{i:04d}", 3) == ["a0000", "a0001", "a0002"]
    assert adapter_names(names=["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError):
        LoadSpec(base_url="http://x", adapters=["a"], rate=1.0, concurrency=2, requests=1).validate()
    with pytest.raises(ValueError):
        LoadSpec(base_url="http://x", adapters=["a"], concurrency=2).validate()
