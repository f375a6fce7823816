"""loadtests/conformance.py's comparison: what counts as a difference of structure (no servers needed)."""
from loadtests.conformance import compare, diff, split


def test_structure_differs_on_keys_types_protocol_values_and_fixed_lengths_not_on_model_output():
    a = {"id": "cmpl-1", "object": "text_completion", "choices": [{"text": "Paris", "finish_reason": "stop", "logprobs": None}]}
    same = {"id": "cmpl-2", "object": "text_completion", "choices": [{"text": "Lyon.", "finish_reason": "stop", "logprobs": None}]}
    assert diff(a, same) == []  # other text, other id: model output and per-call values
    b = {"id": "chatcmpl-2", "object": "chat.completion", "choices": [{"text": 3, "finish_reason": "length"}, {}], "extra": None}
    lines = diff(a, b)
    assert any("$.id: id prefix" in line for line in lines) and any("$.object: hotswap" in line for line in lines)
    assert any("$.choices: hotswap 1 items | vLLM 2" in line for line in lines)
    assert any("$.choices[0].text: hotswap string" in line for line in lines)
    assert any("$.choices[0].logprobs: only hotswap" in line for line in lines) and any("$.extra: only vLLM" in line for line in lines)


def test_streams_compare_their_first_and_last_chunks_and_intentional_differences_are_set_apart():
    h = {"status": 200, "done": True, "chunks": [{"object": "x", "choices": [{"delta": {}}]}, {"object": "x", "choices": []}]}
    v = {"status": 200, "done": False, "chunks": [{"object": "x", "choices": [{"delta": {}}], "prompt_token_ids": None}]}
    lines = compare(h, v)
    assert "[DONE]: hotswap True | vLLM False" in lines and any("prompt_token_ids: only vLLM" in line for line in lines)
    unexpected, known = split([("case", lines)])
    assert "[DONE]: hotswap True | vLLM False" in unexpected[0][1] and list(known) == [next(iter(known))]  # one intentional kind
    assert not any("prompt_token_ids" in line for line in unexpected[0][1])
