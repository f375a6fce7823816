"""server.engine.guided on its own: the batch mask equals a per-row reference with guided and free rows
mixed, a matcher that fails fails its row only, limits refuse specs before compiling, and the spec crosses
processes (Ray Serve) as plain data."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.guided import MAX_NESTING, MAX_PROPERTIES, Grammars, GuidedError, GuidedSpec, check_spec, mask_logits, mask_row_reference
from server.engine.sequence import SamplingParams

VOCAB = 49152  # SmolLM2's logits width


@pytest.fixture(scope="module")
def grammars(model_dir):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return Grammars(tok, VOCAB, [tok.eos_token_id])


def _advanced(grammars, spec: GuidedSpec, text: str):
    state = grammars.start(grammars.compile(spec))
    for t in grammars.tokenizer(text, add_special_tokens=False)["input_ids"]:
        assert state.accept(t)
    return state


def test_the_batch_mask_equals_the_per_row_reference_with_free_rows_untouched(grammars):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["a", "b"]}}, "required": ["n", "tag"]}
    states = {
        1: _advanced(grammars, GuidedSpec.json_schema(schema), '{"n": 12'),  # mid-object
        2: grammars.start(grammars.compile(GuidedSpec("regex", "[0-9]{2}-x"))),  # fresh
        4: _advanced(grammars, GuidedSpec.choice(["yes", "no"]), "ye"),  # mid-word
        5: _advanced(grammars, GuidedSpec("regex", "ab"), "ab"),  # complete: only the stop token is left
    }
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    before = logits.clone()
    assert mask_logits(logits, sorted(states.items())) == {}
    for row in range(6):
        if row in states:
            expected = mask_row_reference(before[row], states[row])
            assert torch.equal(logits[row], expected), row
            assert 0 < int(torch.isfinite(logits[row]).sum()) < VOCAB
        else:
            assert torch.equal(logits[row], before[row]), row
    assert torch.isfinite(logits[5]).nonzero().flatten().tolist() == [grammars.stop_token_ids[0]]


def test_a_failing_matcher_fails_its_row_alone(grammars):
    class Broken:
        def fill(self, bitmask, row):
            raise RuntimeError("matcher state lost")

    good = grammars.start(grammars.compile(GuidedSpec.choice(["yes", "no"])))
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    failures = mask_logits(logits, [(0, Broken()), (2, good)])
    assert list(failures) == [0] and "matcher state lost" in failures[0]
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[1], before[1])
    assert torch.equal(logits[2], mask_row_reference(before[2], good))


def test_limits_refuse_a_spec_before_it_is_compiled(grammars):
    deep: dict = {"type": "string"}
    for _ in range(MAX_NESTING + 1):
        deep = {"type": "array", "items": deep}
    wide = {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(MAX_PROPERTIES + 1)}}
    for spec, reason in [(GuidedSpec.json_schema(deep), "levels deep"), (GuidedSpec.json_schema(wide), "properties"),
                         (GuidedSpec("regex", "a" * 40_000), "bytes"), (GuidedSpec.choice([]), "at least one")]:  # fmt: skip
        with pytest.raises(GuidedError, match=reason):
            check_spec(spec)
        with pytest.raises(GuidedError, match=reason):
            grammars.compile(spec)
    with pytest.raises(GuidedError, match="cannot be compiled: Unsupported type"):
        grammars.compile(GuidedSpec.json_schema({"type": "nonsense"}))


def test_the_spec_travels_as_plain_data_and_keeps_property_order():
    spec = GuidedSpec.json_schema({"type": "object", "properties": {"z": {}, "a": {}}})
    params = SamplingParams(max_tokens=8, guided=spec)
    again = pickle.loads(pickle.dumps(params))
    assert again.guided == spec and hash(again.guided) == hash(spec)
    assert list(json.loads(spec.value)["properties"]) == ["z", "a"]  # the order properties are generated in
