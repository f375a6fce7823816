"""Tool calling on chat completions: tools rendered by the model's chat template, the output constrained or
parsed into OpenAI `tool_calls`, in whole responses and in streamed deltas.

tool_choice, as vLLM serves it:
- "none": the tools are still rendered (the model knows them) and the output is plain content.
- "auto" (the default with tools): free output, parsed Hermes-style as vLLM's `hermes` parser does: each
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` is a call, the text before the first is content;
  output that does not parse is content. finish_reason "tool_calls" when a call was made.
- "required": the output is constrained to a JSON array of one or more {"name", "parameters"} objects
  (one of the tools each, its parameters' schema; at most one with parallel_tool_calls false), then parsed;
  finish_reason "tool_calls".
- {"type": "function", "function": {"name"}}: the output is constrained to that function's parameters
  schema and is the call's arguments; finish_reason "stop" (OpenAI's and vLLM's choice for a named call).

A template that does not use `tools` cannot show the model its tools: such a request is a 400.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from server.api.errors import APIError
from server.api.openai.protocol import ChatCompletionRequest, ChatMessage
from server.engine.client import GuidedSpec

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
ANY_OBJECT = {"type": "object"}  # a function without parameters takes any object (vLLM: the same)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolPlan:
    """What a request's tools and tool_choice mean for its prompt, its grammar and its answer."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[dict]  # as the chat template gets them (OpenAI's shape)
    named: str | None = None  # the function a named tool_choice forces
    guided: GuidedSpec | None = None

    def message(self, text: str) -> tuple[dict, bool]:
        """The assistant message for a whole output, and whether it calls tools."""
        calls, content = self.parse(text)
        if not calls:
            return {"role": "assistant", "content": text}, False
        return {"role": "assistant", "content": content, "tool_calls": [_call(name, args) for name, args in calls]}, True

    def parse(self, text: str) -> tuple[list[tuple[str, str]], str | None]:
        """([(name, arguments JSON text)], content) of an output; no calls if it does not parse."""
        if self.mode == "named":
            return [(self.named, text)], None
        if self.mode == "required":
            try:
                items = json.loads(text)
                return [(item["name"], _args(item.get("parameters", {}))) for item in items], None
            except (ValueError, TypeError, KeyError, RecursionError):  # cut short (max_tokens): plain content
                return [], text
        if self.mode == "auto":
            return parse_hermes(text)
        return [], text

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and self.mode in ("auto", "required") and reason == "stop" else reason

    def streamer(self) -> "ToolStream":
        return ToolStream(self)


def _call(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _args(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def parse_hermes(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """Hermes-style calls in `text` (vLLM's hermes parser): ([(name, arguments)], content before the first
    call, or None). Any call that is not {"name": str, "arguments": ...} JSON: no calls, the text is content."""
    if TOOL_CALL_START not in text:
        return [], text
    calls = []
    try:
        for closed, open_ in _HERMES.findall(text):
            raw = json.loads(closed or open_)
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                return [], text
            calls.append((raw["name"], _args(raw.get("arguments", {}))))
    except (ValueError, RecursionError):
        return [], text
    content = text[: text.index(TOOL_CALL_START)]
    return calls, content if content.strip() else None


@dataclass(slots=True)
class ToolStream:
    """One choice's streamed output turned into OpenAI deltas. Named: the arguments stream as they come.
    Required: the calls are sent whole at the end (a JSON array is only parsed once complete). Auto: content
    streams until a `<tool_call>` may be starting, then the rest is held and parsed at the end."""

    plan: ToolPlan
    held: str = ""  # text not yet sent
    started: bool = False  # named: the call's first delta (id, name) went out
    in_call: bool = False  # auto: a <tool_call> began
    called: bool = False

    def feed(self, text: str, finished: bool) -> list[dict]:
        """Deltas for the new text (and, when finished, for whatever was held)."""
        mode = self.plan.mode
        if mode == "named":
            if not text:
                return []
            if not self.started:
                self.started = self.called = True
                return [{"tool_calls": [_call(self.plan.named, text, 0)]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        if mode == "required" or (mode == "auto" and self.in_call):
            self.held += text
            return self._flush_calls() if finished else []
        if mode != "auto":
            return [{"content": text}] if text else []
        self.held += text
        at = self.held.find(TOOL_CALL_START)
        if at >= 0:
            self.in_call = True
            before, self.held = self.held[:at], self.held[at:]
            out = [{"content": before}] if before else []
            return out + (self._flush_calls() if finished else [])
        # hold back a tail that could begin "<tool_call>"
        keep = next((k for k in range(min(len(TOOL_CALL_START) - 1, len(self.held)), 0, -1) if TOOL_CALL_START.startswith(self.held[-k:])), 0)
        if finished:
            keep = 0
        send, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return [{"content": send}] if send else []

    def _flush_calls(self) -> list[dict]:
        text, self.held = self.held, ""
        calls, content = self.plan.parse(text)
        if not calls:
            return [{"content": text}] if text else []
        self.called = True
        out = [{"content": content}] if content and self.plan.mode != "auto" else []  # auto's content went out already
        return out + [{"tool_calls": [_call(name, args, i)]} for i, (name, args) in enumerate(calls)]


def plan_tools(req: ChatCompletionRequest, template_uses_tools: bool, model: str) -> ToolPlan | None:
    """The request's ToolPlan (None without tools); APIError 400 for a tool_choice that cannot be served."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if not template_uses_tools:
        raise APIError(400, f"model `{model}`'s chat template does not render tools, so it cannot be offered any: "
                            "serve a model whose template takes `tools`", param="tools")  # fmt: skip
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have distinct function names", param="tools")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice is None or choice in ("auto", "none"):
        return ToolPlan(choice or "auto", tools)
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                    "parameters": t.function.parameters or ANY_OBJECT},
                  "required": ["name", "parameters"]} for t in req.tools]  # fmt: skip
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, guided=GuidedSpec.json_schema(schema))
    name = choice.function.name
    tool = next((t for t in req.tools if t.function.name == name), None)
    if tool is None:
        raise APIError(400, f"tool_choice names `{name}`, which is not among the tools", param="tool_choice")
    return ToolPlan("named", tools, named=name, guided=GuidedSpec.json_schema(tool.function.parameters or ANY_OBJECT))


def template_message(m: ChatMessage, content: str) -> dict:
    """A request message as chat templates take it: tool results with their call id, an assistant's
    calls with their arguments as objects (what Hermes-style templates render; vLLM does the same)."""
    out: dict = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _maybe_json(c.function.arguments)}}
                             for c in m.tool_calls]  # fmt: skip
    return out


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text
