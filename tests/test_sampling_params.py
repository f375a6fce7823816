"""Logprobs, echo, penalties, logit_bias, min_tokens and n > 1 sharing its prompt (issue 16).

Oracles: the logits processors' per-row reference (server.engine.logits_processors) and HF transformers
(+ peft) float32 logits. Logprobs are compared with a float32 log-softmax of HF's logits within
LOGPROB_ATOL: the engine's logits are within 2e-3 of HF's (tests/test_oracle_parity.py), and a
log-softmax moves by at most twice a logit's error.
"""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from server.engine.logits_processors import apply_processors, apply_processors_reference
from server.engine.sequence import SamplingParams, Sequence
from server.engine.speculative import SpeculativeConfig

LOGPROB_ATOL = 5e-3
PROMPT = "The capital of France is"


def _hf(model_dir, adapter_dir=None):
    from tests.test_oracle_parity import _hf_model

    return _hf_model(model_dir, adapter_dir)


def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), V): row p is the float32 log-softmax of HF's logits at position p (predicting ids[p + 1])."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _run(engine, seqs: list[Sequence]) -> int:
    """Step the engine until they finish; the tokens it computed."""
    for s in seqs:
        engine.add(s)
    computed = 0
    while engine.has_work():
        engine.step()
        computed += engine.last_step.num_tokens
    return computed


# -- the processors against their reference ----------------------------------------------------------
def test_processors_equal_the_per_row_reference_on_random_logits():
    torch.manual_seed(0)
    V = 500
    params = [
        SamplingParams(),  # untouched
        SamplingParams(presence_penalty=1.5, frequency_penalty=-0.7),
        SamplingParams(repetition_penalty=1.8, logit_bias=((3, 100.0), (499, -42.5))),
        SamplingParams(repetition_penalty=0.6, min_tokens=4, stop_token_ids=(7, 9)),
        SamplingParams(min_tokens=2, logit_bias=((0, -100.0),), presence_penalty=-2.0),  # min_tokens reached: no mask
        SamplingParams(frequency_penalty=2.0, repetition_penalty=1.1, logit_bias=((1000, 5.0),)),  # an id past the vocabulary is dropped
    ]
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 30, 12, 40, 3, 17)]
    outputs = [torch.randint(0, 20, (n,)).tolist() for n in (2, 9, 0, 3, 6, 25)]  # small ids: many repeats
    logits = torch.randn(len(params), V) * 5
    ours = apply_processors(logits.clone(), params, prompts, outputs, frozenset({2}))
    ref = apply_processors_reference(logits, params, prompts, outputs, frozenset({2}))
    assert torch.equal(ours, ref)
    assert torch.equal(ours[0], logits[0]) and not torch.equal(ours[1], logits[1])
    assert ours[3, 2] == ours[3, 7] == float("-inf") and math.isfinite(ours[4, 2])


def test_engine_invariants_refuse_out_of_range_parameters():
    for bad in (dict(presence_penalty=2.5), dict(repetition_penalty=0.0), dict(min_tokens=17), dict(logprobs=21),
                dict(logit_bias=((1, 101.0),)), dict(logit_bias=((1, 1.0), (1, 2.0)))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# -- the engine against HF logits ---------------------------------------------------------------------
def test_penalties_bias_and_min_tokens_pick_the_reference_argmax_of_hf_logits(engine, model_dir):
    """Greedy tokens with every processor on are the argmax of the reference processors over HF's logits,
    and their logprobs are the log-softmax of those processed logits."""
    hf = _hf(model_dir)
    ids = engine.tokenizer(PROMPT)["input_ids"]
    eos = min(engine.eos_token_ids)
    params = SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=1.2, frequency_penalty=0.8, repetition_penalty=1.5,
                            logit_bias=((eos, 100.0), (13, 4.0)), min_tokens=5, logprobs=2)  # fmt: skip
    plain = Sequence(list(ids), SamplingParams(max_tokens=8, temperature=0.0))
    seq = Sequence(list(ids), params)
    _run(engine, [seq, plain])
    out = seq.output_token_ids
    assert out != plain.output_token_ids  # the processors changed something
    assert eos not in out[:5] and out[5] == eos and seq.finish_reason == "stop"  # held back by min_tokens, then the bias wins
    for t, token in enumerate(out):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out[:t]])).logits[0, -1:].float()
        processed = apply_processors_reference(logits, [params], [ids], [out[:t]], engine.eos_token_ids)[0]
        top2 = processed.topk(2).values
        if top2[0] - top2[1] > 1e-2:  # not a near-tie that float32 op order may flip
            assert token == int(processed.argmax()), f"step {t}"
        lp = processed.log_softmax(-1)
        assert abs(seq.output_logprobs[t].logprob - lp[token].item()) < LOGPROB_ATOL


def test_speculative_verify_rows_give_the_same_tokens_and_logprobs(engine):
    """Drafted tokens get their logprobs and penalties from their own verify rows: the same as one at a time."""
    ids = engine.tokenizer("one two three one two three one two three one two")["input_ids"]
    runs = {}
    for drafting in (False, True):
        engine.scheduler.speculator = engine.make_speculator(SpeculativeConfig(num_speculative_tokens=3)) if drafting else None
        try:
            seqs = [Sequence(list(ids), SamplingParams(max_tokens=8, temperature=0.0, logprobs=3, ignore_eos=True)),
                    Sequence(list(ids), SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, frequency_penalty=0.3, ignore_eos=True))]
            _run(engine, seqs)  # two sequences: within disable_by_batch_size, so they draft
            runs[drafting] = seqs
            accepted = engine.speculator.accepted if drafting else 0
        finally:
            engine.scheduler.speculator = None
    assert accepted > 0
    for a, b in zip(runs[False], runs[True]):
        assert a.output_token_ids == b.output_token_ids
        for x, y in zip(a.output_logprobs, b.output_logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_choices_of_one_prompt_compute_it_once(engine):
    """n > 1: the siblings take the first choice's full prompt blocks (prefix cache off, so not from it) and
    compute only the last partial block; each still samples with its own seed."""
    bs = engine.block_manager.block_size
    ids = list(range(1000, 1000 + 2 * bs + 8))  # two full blocks and 8 tokens
    n, new = 3, 4
    caching, engine.block_manager.enable_prefix_caching = engine.block_manager.enable_prefix_caching, False
    try:
        first = Sequence(list(ids), SamplingParams(max_tokens=new, temperature=1.0, seed=11, ignore_eos=True))
        seqs = [first] + [Sequence(list(ids), SamplingParams(max_tokens=new, temperature=1.0, seed=11 + j, ignore_eos=True), prefill_parent=first)
                          for j in range(1, n)]  # fmt: skip
        computed = _run(engine, seqs)
        alone = [Sequence(list(ids), SamplingParams(max_tokens=new, temperature=1.0, seed=11 + j, ignore_eos=True)) for j in range(n)]
        _run(engine, alone)
    finally:
        engine.block_manager.enable_prefix_caching = caching
    assert [s.num_cached_tokens for s in seqs] == [0] + [2 * bs] * (n - 1)
    assert computed == len(ids) + (n - 1) * (len(ids) - 2 * bs) + n * (new - 1)
    assert [s.output_token_ids for s in seqs] == [s.output_token_ids for s in alone]
    assert len({tuple(s.output_token_ids) for s in seqs}) > 1


# -- over HTTP ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("adapter", [None, "r8-all"])
def test_completion_logprobs_and_echo_equal_hf_log_softmax(client, server_engine, model_dir, adapter_dirs, adapter):
    hf = _hf(model_dir, adapter_dirs[adapter] if adapter else None)
    ids = server_engine.tokenizer(PROMPT)["input_ids"]
    r = client.completions.create(model=adapter or "smollm2", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3, echo=True)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT)
    n = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n == len(ids) + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first prompt token
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    # the greedy tokens are HF's argmax (tests/test_oracle_parity.py), so HF scores the same sequence
    full = list(ids)
    ref = _hf_logprobs(hf, full)
    for _ in range(5):
        full.append(int(ref[-1].argmax()))
        ref = _hf_logprobs(hf, full)
    for p in range(1, n):
        assert abs(lp.token_logprobs[p] - ref[p - 1, full[p]].item()) < LOGPROB_ATOL, p
        top = sorted(lp.top_logprobs[p].values(), reverse=True)
        want = ref[p - 1].topk(3).values.tolist()
        assert len(top) in (3, 4)  # the token there and the 3 most likely (it may be one of them)
        if lp.token_logprobs[p] >= want[-1] - LOGPROB_ATOL:
            assert all(abs(a - b) < LOGPROB_ATOL for a, b in zip(top, want))


def test_chat_logprobs_equal_hf_log_softmax(client, server_engine, model_dir):
    hf = _hf(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    tok = server_engine.tokenizer
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    ref = _hf_logprobs(hf, prompt)
    for c in content:
        token = int(ref[-1].argmax())
        assert abs(c.logprob - ref[-1, token].item()) < LOGPROB_ATOL
        assert len(c.top_logprobs) == 2 and abs(c.top_logprobs[0].logprob - c.logprob) < 1e-6  # greedy: the top token
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token
        prompt = prompt + [token]
        ref = _hf_logprobs(hf, prompt)


def _sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_streamed_logprobs_equal_the_whole_response(live_server):
    body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
    whole = httpx.post(live_server.base_url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    with httpx.stream("POST", live_server.base_url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [c["choices"][0] for c in _sse(r)]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    merged = {k: [x for c in chunks if c["logprobs"] for x in c["logprobs"][k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert merged == whole["logprobs"]

    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    whole = httpx.post(live_server.base_url + "/v1/chat/completions", json=chat, timeout=60).json()["choices"][0]
    with httpx.stream("POST", live_server.base_url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as r:
        chunks = [c["choices"][0] for c in _sse(r)]
    assert chunks[0]["logprobs"] is None  # the role chunk
    assert [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]] == whole["logprobs"]["content"]


def test_n_choices_share_their_prompt_and_keep_their_seeds(client):
    prompt = "Write a short story about a dragon who learns to fly over the mountains of the north:"
    many = client.completions.create(model="smollm2", prompt=prompt, n=3, seed=7, max_tokens=6, temperature=1.0, logprobs=0, echo=True)
    single = [client.completions.create(model="smollm2", prompt=prompt, seed=7 + j, max_tokens=6, temperature=1.0).choices[0].text for j in range(3)]
    assert [c.text for c in many.choices] == [prompt + s for s in single]
    # every choice echoes the prompt's logprobs, computed once by the first
    assert all(c.logprobs.token_logprobs[1:-6] == many.choices[0].logprobs.token_logprobs[1:-6] for c in many.choices)


@pytest.mark.parametrize(
    "path, change, param",
    [
        ("completions", {"logprobs": 21}, "logprobs"), ("completions", {"logprobs": True}, "logprobs"),
        ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"), ("completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
        ("completions", {"logit_bias": {"5": 101}}, "logit_bias"), ("completions", {"logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
        ("completions", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"), ("completions", {"min_tokens": 3}, "min_tokens"),
        ("completions", {"repetition_penalty": 0}, "repetition_penalty"), ("completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"), ("chat/completions", {"logprobs": 3}, "logprobs"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)  # fmt: skip
def test_bad_sampling_fields_are_400(live_server, path, change, param):
    base = {"model": "smollm2", "max_tokens": 2}
    base.update({"prompt": "x"} if path == "completions" else {"messages": [{"role": "user", "content": "x"}]})
    r = httpx.post(f"{live_server.base_url}/v1/{path}", json={**base, **change}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].split(".")[0] == param
