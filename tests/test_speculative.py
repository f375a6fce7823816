"""Speculative decoding by prompt lookup: the n-gram drafter against its loop oracle, the verification
rule (exact for greedy rows, distribution-preserving for sampled ones: a statistical test on a small
vocabulary), and the real engine giving exactly the greedy tokens of normal decoding, with adapters."""
from __future__ import annotations

import random
from contextlib import contextmanager

import pytest
import torch

from server.engine.sampler import mask_row_reference, verify, verify_reference
from server.engine.sequence import SamplingParams, Sequence
from server.engine.speculative import SpeculativeConfig, propose_ngram, propose_ngram_reference
from tests.test_sampler import CHI2_CRITICAL, chi_square


# -- the drafter -------------------------------------------------------------------------------------

def test_propose_ngram_matches_the_loop_oracle():
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 40))]
        k, n_min = rng.randrange(1, 6), rng.randrange(1, 4)
        n_max = rng.randrange(n_min, 6)
        assert propose_ngram(tokens, k, n_max, n_min) == propose_ngram_reference(tokens, k, n_max, n_min), (tokens, k, n_max, n_min)


def test_propose_ngram_cases():
    # the longest suffix that occurred before wins, and its most recent occurrence
    assert propose_ngram([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 2, 3, 1) == [9, 2]
    assert propose_ngram([5, 1, 6, 1, 7, 1], 3, 2, 1) == [7, 1]  # "1" last seen before the end at index 3
    assert propose_ngram([1, 2, 3], 4, 3, 1) == []  # nothing repeats
    assert propose_ngram([7], 2, 3, 1) == [] and propose_ngram([], 2, 3, 1) == []
    assert propose_ngram([4, 4], 3, 3, 1) == [4]  # a match must be followed by at least one token
    # big token ids: a byte-level match that straddles two tokens is not a token match
    big = [0x0100_0000_0000_0001, 0x0000_0000_0000_0100, 0x0001, 0x0100_0000_0000_0001 >> 8]
    assert propose_ngram(big, 2, 1, 1) == propose_ngram_reference(big, 2, 1, 1)


def test_speculative_config_from_json():
    cfg = SpeculativeConfig.from_json('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_max, cfg.prompt_lookup_min) == (3, 5, 1)
    for bad in ("nope", "[1]", '{"method": "eagle"}', '{"num_speculative_tokens": 0}', '{"prompt_lookup_min": 3, "prompt_lookup_max": 2}',
                '{"num_speculative_tokens": "2"}', '{"draft_model": "x"}', '{"disable_by_batch_size": true}'):
        with pytest.raises(ValueError):
            SpeculativeConfig.from_json(bad)


# -- the verification rule ---------------------------------------------------------------------------

def test_verify_greedy_rows_accept_exactly_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    top = logits.argmax(-1).tolist()
    drafts = [top[0], (top[1] + 1) % 50, -1, top[3], 7 if top[4] != 7 else 8, top[5]]
    logits[5, 0] = float("nan")  # a row that cannot be sampled accepts nothing
    params = [SamplingParams(temperature=0.0)] * 6
    tokens, accepted = verify(logits, params, list(range(6)), drafts)
    assert accepted.tolist() == [True, False, False, True, False, False]
    assert tokens[:5].tolist() == top[:5] and tokens[5] == -1
    ref_tokens, ref_accepted = verify_reference(logits, params, list(range(6)), drafts)
    assert torch.equal(ref_tokens, tokens) and torch.equal(ref_accepted, accepted)


def _emitted(tokens: torch.Tensor, accepted: torch.Tensor, drafts: list[int]) -> torch.Tensor:
    """The token each row gives: its draft where accepted, else its own."""
    return torch.where(accepted, torch.tensor(drafts), tokens)


def _target(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    return mask_row_reference(row / p.temperature, p).softmax(-1)


CASES = [  # (params, draft token): a likely draft, an unlikely one, one the mask removes, none
    (SamplingParams(temperature=1.0), 0),
    (SamplingParams(temperature=0.7), 5),
    (SamplingParams(temperature=1.3, top_k=3), 5),  # token 5 is outside the top 3: never accepted
    (SamplingParams(temperature=1.0, top_p=0.8), 1),
    (SamplingParams(temperature=1.0, top_k=4, top_p=0.9), -1),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seeded", [False, True])
def test_verify_preserves_the_sampling_distribution(case, seeded):
    """What a row gives (accepted draft or its own token) is distributed as the row's masked softmax,
    whatever the draft: a chi-square test over 20,000 rows of a 6-token vocabulary."""
    params, draft = CASES[case]
    logits = torch.tensor([2.0, 1.2, 0.9, 0.3, -0.5, -1.0])
    n = 20_000
    torch.manual_seed(1234 + case)
    rows = [SamplingParams(params.max_tokens, params.temperature, params.top_p, params.top_k, seed=i if seeded else None) for i in range(n)]
    tokens, accepted = verify(logits.expand(n, -1).contiguous(), rows, [17] * n, [draft] * n)
    got = torch.bincount(_emitted(tokens, accepted, [draft] * n), minlength=6).double()
    p = _target(logits, params).double()
    support = p > 0
    assert got[~support].sum() == 0, "a token outside the mask was given"
    probs = p[support] / p[support].sum()
    assert chi_square(got[support], probs) < CHI2_CRITICAL[int(support.sum()) - 1]
    if draft >= 0:  # and the draft is accepted as often as it is likely
        rate = accepted.double().mean().item()
        assert abs(rate - p[draft].item()) < 4 * (p[draft].item() * (1 - p[draft].item()) / n) ** 0.5 + 1e-9


def test_verify_reference_preserves_the_distribution_too():
    params, draft = CASES[1]
    logits = torch.tensor([2.0, 1.2, 0.9, 0.3, -0.5, -1.0])
    n = 3000
    torch.manual_seed(5)
    tokens, accepted = verify_reference(logits.expand(n, -1), [params] * n, [0] * n, [draft] * n)
    got = torch.bincount(_emitted(tokens, accepted, [draft] * n), minlength=6).double()
    assert chi_square(got, _target(logits, params).double()) < CHI2_CRITICAL[5]


def test_verify_seeded_rows_repeat_and_mixed_batches_agree():
    """Seeded rows give the same (token, accepted) for the same seed and position, whatever else the
    batch holds; greedy and sampled rows mix in one call."""
    torch.manual_seed(0)
    logits = torch.randn(4, 40)
    params = [SamplingParams(temperature=0.9, seed=11), SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.9, seed=11)]
    drafts = [3, int(logits[1].argmax()), 4, 3]
    tokens, accepted = verify(logits, params, [5, 5, 5, 5], drafts)
    assert accepted[1] and tokens[1] == drafts[1]
    alone = verify(logits[:1], params[:1], [5], drafts[:1])
    assert tokens[0] == alone[0][0] and accepted[0] == alone[1][0]
    logits[3] = logits[0]
    again = verify(logits, params, [5, 5, 5, 5], drafts)
    assert again[0][3] == again[0][0] and again[1][3] == again[1][0]


# -- the engine ----------------------------------------------------------------------------------------

@contextmanager
def speculating(engine, **options):
    """The session engine with speculative decoding on, for the duration (off again after)."""
    old = engine.scheduler.speculator
    engine.scheduler.speculator = engine.make_speculator(SpeculativeConfig(**options))
    try:
        yield engine.speculator
    finally:
        engine.scheduler.speculator = old


REPETITIVE = "Repeat after me five times: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."


def _run(engine, jobs: list[tuple[str, str | None, SamplingParams]]) -> list[Sequence]:
    seqs = [Sequence(engine.tokenizer(p)["input_ids"], params, a) for p, a, params in jobs]
    for s in seqs:
        engine.add(s)
    while engine.has_work():
        engine.step()
    return seqs


def test_engine_greedy_tokens_are_those_of_normal_decoding(engine, k=3):
    """Base model and LoRA adapters (q/v only, all seven modules), alone and three at a time: the same
    greedy tokens with drafts as without, and the drafts did get accepted (the path ran)."""
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    jobs = [(REPETITIVE, None, greedy), (REPETITIVE, "r4-qv", greedy), (REPETITIVE + " the quick", "r8-all", greedy)]
    plain = [s.output_token_ids for s in _run(engine, jobs)] + [s.output_token_ids for s in _run(engine, jobs[:1])]
    with speculating(engine, num_speculative_tokens=k) as spec:
        together = [s.output_token_ids for s in _run(engine, jobs)]
        alone = [s.output_token_ids for s in _run(engine, jobs[:1])]
        assert spec.accepted > 0 and spec.drafted >= spec.accepted
    assert together + alone == plain


def test_engine_stops_inside_an_accepted_draft(engine):
    """max_tokens, stop token ids and stop strings end a sequence at the same token with drafts as
    without: the tokens after the one that ends it are dropped, text and usage included."""
    probe = _run(engine, [(REPETITIVE, None, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))])[0].output_token_ids
    stop_id = probe[25]
    text = engine.tokenizer.decode(probe[:30])
    stop_string = text[-6:]
    cases = [SamplingParams(max_tokens=23, temperature=0.0, ignore_eos=True),
             SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,)),
             SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop_string,))]
    results = []
    for spec in (False, True):
        got = []
        for params in cases:
            if spec:
                with speculating(engine, num_speculative_tokens=4):
                    seq = _run(engine, [(REPETITIVE, None, params)])[0]
            else:
                seq = _run(engine, [(REPETITIVE, None, params)])[0]
            got.append((seq.output_token_ids, seq.finish_reason))
        results.append(got)
    assert results[0] == results[1]
    assert len(results[1][0][0]) == 23 and results[1][0][1] == "length"
    assert results[1][1][0][-1] == stop_id and results[1][1][1] == "stop"
    assert results[1][2][1] == "stop"


def test_engine_drafts_only_for_small_batches(engine):
    """More sequences than disable_by_batch_size running or waiting: no drafts at all."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    with speculating(engine, disable_by_batch_size=2) as spec:
        _run(engine, [(REPETITIVE, None, greedy)] * 3)
        assert spec.drafted == 0
        _run(engine, [(REPETITIVE, None, greedy)] * 2)
        assert spec.drafted > 0


def test_engine_sampled_requests_with_drafts_finish_and_repeat_with_a_seed(engine):
    """Sampled rows go through verification (their distribution is the test above): seeded requests
    give the same tokens twice."""
    params = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    with speculating(engine, num_speculative_tokens=3) as spec:
        a = _run(engine, [(REPETITIVE, "r4-qv", params)])[0]
        b = _run(engine, [(REPETITIVE, "r4-qv", params)])[0]
        assert spec.drafted > 0
    assert a.output_token_ids == b.output_token_ids and len(a.output_token_ids) == 32
