"""Structured output at the API edge: what a request's response_format / structured_outputs / guided_*
fields ask for, as one GuidedSpec (server.engine.guided), or a 400 that says what to change.

Accepted, as vLLM does (its 0.32 OpenAI server takes response_format and structured_outputs; we also take
the guided_json / guided_regex / guided_choice / guided_grammar fields that it dropped and now ignores):
- response_format {"type": "text"} (no constraint), {"type": "json_object"}, {"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}};
- structured_outputs {"json" | "regex" | "choice" | "grammar" | "json_object"} plus disable_any_whitespace
  and disable_additional_properties; whitespace_pattern and structural_tag are refused (400);
- guided_json (a schema object or its JSON text), guided_regex, guided_choice, guided_grammar (xgrammar's EBNF).
At most one constraint per request.
"""
from __future__ import annotations

import json

from server.api.errors import APIError
from server.api.openai.protocol import SamplingFields
from server.engine.client import GuidedError, GuidedSpec, check_spec

MAX_SCHEMA_TEXT = 256 * 1024  # a schema given as JSON text is parsed only below this (the compile limit is far lower)


def guided_spec(req: SamplingFields) -> GuidedSpec | None:
    """The request's one output constraint (None: free text); APIError 400 if it asks for several or for
    something not served; GuidedError (400) if the spec breaks a limit (checked here, before any compile)."""
    found: list[tuple[str, GuidedSpec]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", GuidedSpec("json_object")))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", param="response_format.json_schema")
        found.append(("response_format", GuidedSpec.json_schema(rf.json_schema.schema_)))
    if req.guided_json is not None:
        found.append(("guided_json", _json_spec(req.guided_json, "guided_json")))
    if req.guided_regex is not None:
        found.append(("guided_regex", GuidedSpec("regex", req.guided_regex)))
    if req.guided_choice is not None:
        found.append(("guided_choice", GuidedSpec.choice(req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", GuidedSpec("grammar", req.guided_grammar)))
    if req.structured_outputs is not None:
        found += _structured_outputs(req)
    if len(found) > 1:
        raise APIError(400, f"ask for one output constraint at a time, not {', '.join(name for name, _ in found)}", param=found[1][0])
    if not found:
        return None
    param, spec = found[0]
    try:
        check_spec(spec)
    except GuidedError as e:
        raise APIError(400, e.message, param=param, code="invalid_structured_output") from None
    return spec


def _json_spec(schema, param: str, any_whitespace: bool = True, no_additional: bool = False) -> GuidedSpec:
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_TEXT:
            raise APIError(400, f"the JSON schema is {len(schema)} characters; this server compiles far smaller ones", param=param,
                           code="invalid_structured_output")  # fmt: skip
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError):
            raise APIError(400, "the JSON schema is not valid JSON", param=param, code="invalid_structured_output") from None
    if not isinstance(schema, dict | bool):
        raise APIError(400, "a JSON schema is an object (or true / false)", param=param, code="invalid_structured_output")
    if no_additional and isinstance(schema, dict):
        schema = _no_additional_properties(schema)
    return GuidedSpec.json_schema(schema, any_whitespace)


def _no_additional_properties(schema: dict) -> dict:
    """vLLM's disable_additional_properties: every object schema without an additionalProperties of its
    own gets additionalProperties: false (a copy; iterative, the nesting limit comes later)."""
    root = json.loads(json.dumps(schema))
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return root


def _structured_outputs(req: SamplingFields) -> list[tuple[str, GuidedSpec]]:
    so, param = req.structured_outputs, "structured_outputs"
    if so.whitespace_pattern is not None:
        raise APIError(400, "structured_outputs.whitespace_pattern is not supported (xgrammar has no whitespace pattern)",
                       param=f"{param}.whitespace_pattern")  # fmt: skip
    if so.structural_tag is not None:
        raise APIError(400, "structured_outputs.structural_tag is not supported", param=f"{param}.structural_tag")
    found = []
    if so.json_ is not None:
        found.append((f"{param}.json", _json_spec(so.json_, f"{param}.json", not so.disable_any_whitespace, so.disable_additional_properties)))
    if so.regex is not None:
        found.append((f"{param}.regex", GuidedSpec("regex", so.regex)))
    if so.choice is not None:
        found.append((f"{param}.choice", GuidedSpec.choice(so.choice)))
    if so.grammar is not None:
        found.append((f"{param}.grammar", GuidedSpec("grammar", so.grammar)))
    if so.json_object:
        found.append((f"{param}.json_object", GuidedSpec("json_object")))
    if not found:
        raise APIError(400, "structured_outputs names no constraint (json, regex, choice, grammar or json_object)", param=param)
    return found
