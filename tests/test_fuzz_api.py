"""Schema-driven fuzzing of the whole HTTP API against a real, hostile-configured server.

What is fuzzed: every operation of the server's own OpenAPI schema (built in-process from
`build_app(engine).openapi()`: the hostile server itself serves no /openapi.json, as its admin key
turns the docs off), sent over HTTP to the real `hotswap serve` process of tests/hostile_server.py
(admin key, SeaweedFS store, tenants `acme` and `globex`).

How: schemathesis 4 (`schemathesis.openapi.from_dict`, `APIOperation.as_strategy`, `Case.call`)
generates the requests inside Hypothesis, one pytest test per operation:
- positive (schema-valid) and, for operations with a JSON body, negative (schema-violating: wrong
  types, out-of-range numbers, missing fields, malformed JSON) data, with arbitrary Unicode and NULs;
- the caller is drawn too: mostly the right key (a tenant key on /v1, the admin key on /admin), but
  also no key, a wrong key, the admin key without "Bearer", and a tenant key on the admin API;
- names are steered towards resources that exist (tenants, adapters, models, a key id) some of the
  time, or nearly every request would stop at a 404 before reaching anything interesting;
- the completion routes also draw from the schema narrowed to what the server serves (no refused
  fields, existing models, non-empty prompts), or nearly no case would reach the engine;
- each request's work is bounded (`max_tokens` <= 8, `n` <= 2) so that CI fits a 2-core CPU.

What must hold, for every case: no 5xx (nor an in-band server error in a stream), an OpenAI-shaped
JSON body for every error, a 401 for every wrong caller, a 4xx for every schema-violating request,
nothing internal in any body (tracebacks, exception names, the store's endpoint, bucket or prefix,
credentials), an answer within CASE_TIMEOUT_S, and a live server process. Throughout the run,
`HealthWatch` must see every public /health answer within a second and `Witness` must see tenant
globex's greedy stream unchanged.

Cost: HOTSWAP_FUZZ_EXAMPLES cases per operation (default 40: about a minute for the file on the
2-core CI machine); `make fuzz` sets 500. Each operation's Hypothesis seed is fixed (change it with
HOTSWAP_FUZZ_SEED), so a run is reproducible: a failure names the request (as a curl command, the
key shown as [Filtered] and the caller's role named) and re-running the same test repeats it.
`pytest -rP` prints, per operation, how many cases got which status, by kind of data and caller.
"""
from __future__ import annotations

import builtins
import copy
import json
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.hostile_server import TENANTS, HealthWatch, Witness

EXAMPLES = int(os.environ.get("HOTSWAP_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("HOTSWAP_FUZZ_SEED", "0")  # another value explores other cases, as reproducibly
CASE_TIMEOUT_S = 20.0
MAX_TOKENS_CAP, N_CAP = 8, 2
FIT_EPOCHS_CAP = 50

# In run order: the OpenAI routes first, while every adapter is in place, then the admin API,
# deletions last. Every operation of the schema must be listed here (test_every_operation_is_fuzzed).
OPERATIONS = [
    "GET /v1/models",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /v1/load_lora_adapter",  # vLLM's runtime adapter endpoints: admin key only (a tenant key gets 403)
    "POST /v1/unload_lora_adapter",
    "GET /health",
    "GET /metrics",
    "GET /admin/v1/tenants",
    "POST /admin/v1/tenants",
    "POST /admin/v1/tenants/{tenant}/keys",
    "GET /admin/v1/tenants/{tenant}",
    "GET /admin/v1/adapters",
    "GET /admin/v1/adapters/{tenant}/{name}",
    # The upload route parses `request.form()` itself, so the schema declares no body and
    # schemathesis cannot generate multipart uploads: only the empty body and the callers are fuzzed
    # here; hostile uploads (corrupt, oversized, archives escaping their directory) are hand-written.
    "POST /admin/v1/adapters",
    "POST /admin/v1/adapters:generate",
    "POST /admin/v1/generators:fit",
    "GET /admin/v1/generators",
    "GET /admin/v1/generators/{tenant}/{name}",
    "POST /admin/v1/adapters/{tenant}/{name}/pin",
    "POST /admin/v1/adapters/{tenant}/{name}/unpin",
    "PUT /admin/v1/adapters/{tenant}/{name}/users/{user}",
    "GET /admin/v1/adapters/{tenant}/{name}/users/{user}",
    "PATCH /admin/v1/tenants/{tenant}",  # quotas: aimed at the fuzz tenant only, like the deletions
    "DELETE /admin/v1/tenants/{tenant}/keys/{key_id}",
    "DELETE /admin/v1/adapters/{tenant}/{name}",
    "DELETE /admin/v1/generators/{tenant}/{name}",
]

# A tenant of this module's own, with an adapter and a key that fuzzed deletions may destroy.
FUZZ_TENANT, FUZZ_ADAPTER, FUZZ_SOURCE, FUZZ_RECLORA = "fuzz", "victim", "r2-mlp", "persona"
WITNESS_TENANT = "globex"  # its adapter serves the Witness stream: nothing destructive may name it
DESTRUCTIVE = {"DELETE /admin/v1/tenants/{tenant}/keys/{key_id}", "DELETE /admin/v1/adapters/{tenant}/{name}", "PATCH /admin/v1/tenants/{tenant}"}

# Exception class names that would mean a Python error's text reached a client.
EXCEPTION_NAMES = sorted(n for n in dir(builtins) if n.endswith("Error")) + ["botocore", "ClientError", "StoreUnavailable"]


# -- the schema and the bounds on work ---------------------------------------------------------
def bound_work(label: str, body):
    """Cap what one generated request may ask the engine to do, leaving everything else as generated.

    Positive integers are capped; absent (or null: the server's default, up to the whole context for
    chat) token budgets become the cap; any other value, too small or of a wrong type, is sent as is
    so that the server's validation is still fuzzed."""
    if not isinstance(body, dict):
        return body
    budgets = {"POST /v1/completions": ("max_tokens",), "POST /v1/chat/completions": ("max_tokens", "max_completion_tokens")}
    for key in budgets.get(label, ()):
        value = body.get(key)
        if value is None:
            body[key] = MAX_TOKENS_CAP
        elif _positive_int(value):
            body[key] = min(value, MAX_TOKENS_CAP)
    if label in budgets and _positive_int(body.get("n")):
        body["n"] = min(body["n"], N_CAP)
    if label == "POST /admin/v1/generators:fit" and _positive_int(body.get("epochs")):
        body["epochs"] = min(body["epochs"], FIT_EPOCHS_CAP)  # a valid fit may run 20,000 epochs: seconds to a minute
    return body


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # JSON true is no integer


def load_schema(raw: dict):
    schema = schemathesis.openapi.from_dict(raw, config=schemathesis.Config())

    @schema.hook
    def map_body(context, body):  # applied to every generated body, positive and negative alike
        return bound_work(context.operation.label, body)

    return schema


@pytest.fixture(scope="module")
def raw_schema(engine) -> dict:
    from server.api.app import build_app

    return build_app(engine).openapi()


@pytest.fixture(scope="module")
def api_schema(raw_schema):
    return load_schema(copy.deepcopy(raw_schema))


ENGINE_ROUTES = ("POST /v1/completions", "POST /v1/chat/completions")


def served_subset(raw: dict, models: list[str], vocab: int) -> dict:
    """The request schema narrowed to what the server serves rather than refuses by design.

    Nearly every positive case of the full schema asks for something refused with a 400 before any
    work (suffix, an empty prompt, token ids past the vocabulary, a model that
    does not exist), so on its own it would almost never reach the engine. Cases of this subset do,
    and still vary every field the server accepts."""
    raw = copy.deepcopy(raw)
    schemas = raw["components"]["schemas"]
    text = {"type": "string", "minLength": 1}
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": vocab - 1}}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        for refused in ("suffix", "stream_options", "adapters", "merge_strategy"):
            props.pop(refused, None)
        props["model"] = {"enum": models}
        props["stop_token_ids"] = token_ids
    schemas["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [text, {"type": "array", "minItems": 1, "items": text}, token_ids]}
    schemas["ChatMessage"]["properties"]["content"] = text
    return raw


@pytest.fixture(scope="module")
def served_schema(raw_schema, engine, target):
    return load_schema(served_subset(raw_schema, target.served_models, engine.model.config.vocab_size))


def test_every_operation_is_fuzzed(api_schema):
    """A route added to the server must be added to OPERATIONS (or it would silently go unfuzzed)."""
    in_schema = {op.ok().label for op in api_schema.get_all_operations()}
    assert in_schema == set(OPERATIONS)


# -- what exists on the server, for steering names ----------------------------------------------
@dataclass
class Adapter:
    files: dict[str, bytes]
    description: str = ""
    public: bool = False

    def upload(self, hostile, tenant: str, name: str) -> None:
        form = {"tenant": tenant, "name": name, "description": self.description, "public": str(self.public).lower()}
        with hostile.admin() as admin:
            r = admin.post("/admin/v1/adapters", data=form, files={f: (f, data) for f, data in self.files.items()})
        assert r.status_code == 201, r.text


@dataclass
class Target:
    """Names that exist on the server; a generated name is replaced by one of these some of the time."""

    paths: list[dict[str, str]]  # existing combinations of path parameters
    fields: dict[str, dict[str, list]]  # operation label -> body field -> existing values
    bodies: dict[str, list[dict]]  # operation label -> valid bodies
    served_models: list[str]  # what acme may run
    seeded: dict[tuple[str, str], Adapter]  # what a fuzzed DELETE may remove and is put back


@pytest.fixture(scope="module")
def target(hostile, adapter_dirs, engine):
    from tests.test_reclora import K, USER_DIM, make_reclora

    def peft(source: str) -> dict[str, bytes]:
        return {f: (adapter_dirs[source] / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}

    acme_adapter, (witness_adapter, _) = TENANTS["acme"][0], TENANTS[WITNESS_TENANT]
    seeded = {
        ("acme", acme_adapter): Adapter(peft(TENANTS["acme"][1])),  # as hostile_server made it, for restoring only
        # A description makes it an expert that adapters:generate can fuse, so generation runs for real.
        (FUZZ_TENANT, FUZZ_ADAPTER): Adapter(peft(FUZZ_SOURCE), description="Answers questions about fuzzing HTTP APIs."),
        # Per-user state needs a RecLoRA adapter; public, so that acme's requests run it too.
        (FUZZ_TENANT, FUZZ_RECLORA): Adapter(make_reclora(engine.model.config)[0], public=True),
    }
    with hostile.admin() as admin:
        assert admin.post("/admin/v1/tenants", json={"name": FUZZ_TENANT}).status_code == 201
        key_id = admin.post(f"/admin/v1/tenants/{FUZZ_TENANT}/keys").json()["id"]
    for (tenant, name), adapter in seeded.items():
        if tenant == FUZZ_TENANT:
            adapter.upload(hostile, tenant, name)
    with hostile.tenant("acme") as acme:
        served_models = [m["id"] for m in acme.get("/v1/models").json()["data"]]
    # What acme may use, and what it must not see (another tenant's private adapters answer 404).
    models = served_models + [f"{WITNESS_TENANT}/{witness_adapter}", f"{FUZZ_TENANT}/{FUZZ_ADAPTER}"]
    tenants = ["acme", WITNESS_TENANT, FUZZ_TENANT]
    experts = [[FUZZ_ADAPTER], [f"{FUZZ_TENANT}/{FUZZ_ADAPTER}"], [f"{WITNESS_TENANT}/{witness_adapter}"], [f"{FUZZ_TENANT}/{FUZZ_RECLORA}"]]
    yield Target(
        paths=[
            *({"tenant": t} for t in tenants),
            *({"tenant": t, "name": n} for t, n in [(WITNESS_TENANT, witness_adapter), *seeded]),
            {"tenant": FUZZ_TENANT, "key_id": key_id},
            {"tenant": FUZZ_TENANT, "name": FUZZ_RECLORA, "user": "alice"},
        ],
        fields={
            "POST /v1/completions": {"model": models},
            "POST /v1/chat/completions": {"model": models},
            "POST /admin/v1/tenants": {"name": [*tenants, "fuzz-new"]},
            "POST /admin/v1/adapters:generate": {
                "tenant": [FUZZ_TENANT, "acme"], "name": ["generated", FUZZ_ADAPTER], "experts": experts, "generator": ["fusion"],
            },
            "POST /admin/v1/generators:fit": {"tenant": [FUZZ_TENANT, "acme"]},
        },
        bodies={"PUT /admin/v1/adapters/{tenant}/{name}/users/{user}": [{"weights": [1.0 / K] * K}, {"weights": [1.0]}, {"vector": [0.5] * USER_DIM}]},
        served_models=served_models,
        seeded=seeded,
    )
    # Leave the session's server as other test modules expect it: nothing pinned, no adapters but
    # the two tenants' own (the tenants and keys made here stay: the admin API deletes neither).
    with hostile.admin() as admin:
        for tenant, (name, _) in TENANTS.items():
            admin.post(f"/admin/v1/adapters/{tenant}/{name}/unpin")
        for m in admin.get("/admin/v1/adapters").json()["data"]:
            if TENANTS.get(m["tenant"], ("",))[0] != m["name"]:
                admin.delete(f"/admin/v1/adapters/{m['tenant']}/{m['name']}")


def steer(case, kind: str, label: str, target: Target, data) -> None:
    """Point some generated requests at things that exist, as Hypothesis draws (choice 0 keeps what was
    generated, and is what shrinking goes back to):
    - path parameters: one of the existing combinations (a tenant, a tenant's adapter, its key, a user);
    - in positive cases only (a negative case must keep the value that violates the schema), body
      fields: an existing name in place of a generated string; or the whole body: a valid one, for
      an operation whose random bodies are nearly never valid."""

    def choose(options: list, what: str):
        i = data.draw(st.integers(0, len(options)), label=f"steer {what}") if options else 0
        return None if i == 0 else options[i - 1]

    params = case.path_parameters or {}
    if chosen := choose([p for p in target.paths if set(p) <= set(params)], "path"):
        params.update(chosen)
    if kind != "positive":
        return
    if (body := choose(target.bodies.get(label, []), "body")) is not None:
        case.body = copy.deepcopy(body)
    if isinstance(case.body, dict):
        for name, values in target.fields.get(label, {}).items():
            if name in case.body and (value := choose([v for v in values if isinstance(case.body[name], type(v))], name)) is not None:
                case.body[name] = value


def spare_the_witness(case, label: str) -> None:
    """Nothing destructive may name the witness tenant: its adapter serves the stream Witness checks.
    Path parameters arrive percent-encoded, so they are compared decoded (and in any case)."""
    if label in DESTRUCTIVE:
        for name, value in case.path_parameters.items():
            if isinstance(value, str) and WITNESS_TENANT in unquote(value).lower():
                case.path_parameters[name] = FUZZ_TENANT
    if label == "POST /admin/v1/adapters:generate" and isinstance(case.body, dict):
        tenant = case.body.get("tenant")
        if isinstance(tenant, str) and WITNESS_TENANT in tenant.lower():
            case.body["tenant"] = FUZZ_TENANT  # it would publish (a new version of) an adapter of globex


def restore_deleted(case, label: str, response, hostile, target: Target) -> None:
    """A fuzzed DELETE that removed a seeded adapter puts it back, so later cases (and later test
    modules on the same session server) still find it."""
    if label != "DELETE /admin/v1/adapters/{tenant}/{name}" or response.status_code != 200:
        return
    tenant, name = (unquote(case.path_parameters[k]) for k in ("tenant", "name"))
    if (tenant, name) in target.seeded:
        target.seeded[tenant, name].upload(hostile, tenant, name)


# -- callers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    role: str
    authorization: str | None  # the Authorization header, or None for none
    refused: bool  # the server must answer 401

    def headers(self) -> dict[str, str]:
        return {} if self.authorization is None else {"Authorization": self.authorization}


def callers(label: str, hostile) -> list[Caller]:
    """The right caller first, weighted 6:1 against each wrong one."""
    path = label.split(" ", 1)[1]
    admin = Caller("admin key", f"Bearer {hostile.admin_key}", False)
    wrong = [
        Caller("no key", None, True),
        Caller("wrong key", "Bearer sk-not-a-key-0000000000000000", True),
        Caller("admin key without Bearer", hostile.admin_key, True),
    ]
    tenant = Caller("acme's key", f"Bearer {hostile.keys['acme']}", False)
    if path.startswith("/v1/"):
        return [tenant] * 6 + [admin] + wrong
    if path.startswith("/admin/"):
        return [admin] * 6 + wrong + [Caller("acme's key on the admin API", tenant.authorization, True)]
    return [Caller("no key", None, False)] * 6 + [admin, Caller("wrong key", "Bearer sk-not-a-key", False)]  # public routes


# -- what every answer must satisfy ------------------------------------------------------------
def internals(hostile) -> tuple[list[str], list[str]]:
    """(never in any body, not in bodies for anyone but the admin). The admin may see where the store is
    (/health with the admin key names it, and so do its store errors), never a traceback or a secret."""
    endpoint = hostile.s3.endpoint
    always = ["Traceback", 'File "', *EXCEPTION_NAMES, hostile.s3.secret_key, hostile.s3.access_key, hostile.admin_key]
    store = [endpoint, urlsplit(endpoint).netloc, "s3://", hostile.s3.bucket, "hostile"]
    return always, store


def problems(case, kind: str, caller: Caller, response, hostile) -> list[str]:
    found = []
    status, text = response.status_code, response.text
    if status >= 500 and not (status == 503 and header(response, "retry-after")):
        found.append(f"server error {status}")
    if caller.refused and status != 401:
        found.append(f"{caller.role} was not refused (expected 401)")
    if kind == "negative" and not 400 <= status < 500:
        found.append("a request that violates the schema was not refused with a 4xx")
    if status >= 400:
        found += error_shape(response)
    elif header(response, "content-type").startswith("text/event-stream"):
        found += stream_problems(text)
    # A needle the request itself carries may be echoed in a 4xx message ("model `X` does not exist").
    written, sent = server_words(response), request_words(case)
    always, store = internals(hostile)
    needles = always + ([] if caller.role == "admin key" else store)
    found += [f"body contains {n!r}" for n in needles if n and n in written and n not in sent]
    return found


def server_words(response) -> str:
    """What the server wrote in a body, decoded (on the wire a traceback's `File "x"` is `File \\"x\\"`),
    leaving out the model's own words in `choices`: generated text may say anything."""
    if header(response, "content-type").startswith("text/event-stream"):
        documents = [_parsed(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]
    else:
        documents = [_parsed(response.text)]
    return "\n".join(_strings(documents))


def request_words(case) -> str:
    body = case.body.decode(errors="replace") if isinstance(case.body, bytes) else case.body
    params = {k: unquote(v) if isinstance(v, str) else v for k, v in (case.path_parameters or {}).items()}
    return "\n".join(_strings([params, case.query, body], skip=()))


def _parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _strings(value, skip=("choices",)):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in skip:
                yield str(key)
                yield from _strings(item, skip)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, skip)


def header(response, name: str) -> str:
    """A header of a schemathesis Response (its headers map lower-cased names to lists of values)."""
    return next(iter(response.headers.get(name, ())), "")


def error_shape(response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return ["error body is not JSON"]
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return ['error body is not {"error": {"message", "type", "param", "code"}}']
    found = []
    if not (isinstance(err["message"], str) and err["message"]) or not (isinstance(err["type"], str) and err["type"]):
        found.append("error message or type is not a non-empty string")
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        found.append("error param or code is neither a string nor null")
    return found


def stream_problems(text: str) -> list[str]:
    """An SSE stream must end with [DONE]; an in-band error is a streamed 5xx."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    found = [] if events and events[-1] == "[DONE]" else ["stream did not end with data: [DONE]"]
    for event in events[:-1]:
        try:
            chunk = json.loads(event)
        except ValueError:
            found.append(f"stream chunk is not JSON: {event[:200]!r}")
            continue
        if "error" in chunk:
            found.append(f"in-band error in the stream: {chunk['error']}")
    return found


@dataclass
class FakeResponse:
    status_code: int
    text: str
    headers: dict[str, list[str]]

    def json(self):
        return json.loads(self.text)


def test_the_checks_catch_what_they_are_for(hostile):
    """The checks themselves, on made-up answers: each failure kind is caught, and what is allowed passes."""
    case, tenant, admin = SimpleNamespace(path_parameters={}, query={}, body={"model": "x"}), *callers("GET /v1/models", hostile)[::6]
    json_type = {"content-type": ["application/json"]}

    def error(message: str, status: int = 400, headers=json_type) -> FakeResponse:
        return FakeResponse(status, json.dumps({"error": {"message": message, "type": "t", "param": None, "code": None}}), headers)

    assert problems(case, "positive", tenant, error("fine"), hostile) == []
    assert problems(case, "positive", tenant, error("busy", 503, {**json_type, "retry-after": ["5"]}), hostile) == []
    assert problems(case, "positive", tenant, error("boom", 500), hostile) == ["server error 500"]
    assert problems(case, "negative", tenant, FakeResponse(200, "{}", json_type), hostile) == ["a request that violates the schema was not refused with a 4xx"]
    assert problems(case, "positive", tenant, FakeResponse(422, '{"detail": []}', json_type), hostile) == ['error body is not {"error": {"message", "type", "param", "code"}}']
    assert problems(case, "positive", tenant, error('Traceback: File "x", KeyError'), hostile) == [
        "body contains 'Traceback'", "body contains 'File \"'", "body contains 'KeyError'"]  # fmt: skip
    store_error = error(f"cannot reach {hostile.s3.endpoint}")
    assert problems(case, "positive", tenant, store_error, hostile) != [] and problems(case, "positive", admin, store_error, hostile) == []
    stream = {"content-type": ["text/event-stream"]}
    assert problems(case, "positive", tenant, FakeResponse(200, 'data: {"choices": []}\n\n', stream), hostile) == ["stream did not end with data: [DONE]"]
    generated = json.dumps({"choices": [{"index": 0, "text": "a hostile TypeError"}]})  # the model may say anything
    assert problems(case, "positive", tenant, FakeResponse(200, generated, json_type), hostile) == []
    in_band = 'data: {"error": {"message": "m"}}\n\ndata: [DONE]\n\n'
    assert problems(case, "positive", tenant, FakeResponse(200, in_band, stream), hostile) == ["in-band error in the stream: {'message': 'm'}"]


# -- the watchers and the fuzzing --------------------------------------------------------------
@pytest.fixture(scope="module")
def watchers(hostile, target):
    with HealthWatch(hostile.url) as hw, Witness(hostile) as w:
        yield hw, w


def assert_nobody_else_hurt(hw: HealthWatch, w: Witness, hostile) -> None:
    report = f"/health polls {hw.polls}, slowest {hw.slowest:.2f} s; witness streams {w.runs}"
    assert not hw.failures, f"/health stalled or failed: {hw.failures[:10]} ({report})"
    assert not w.failures, f"the witness tenant's stream changed or failed: {w.failures[:10]} ({report})"
    assert hostile.alive(), hostile.log_text()[-4000:]


def strategy(label: str, api_schema, served_schema):
    """(kind, case) pairs: positive and, where there is a body to violate, negative cases of the full
    schema (path parameters are plain strings: nothing violates their schema); the engine routes
    draw half their cases from the served subset, so that the engine runs for real."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    kinds = [("positive", operation.as_strategy(generation_mode=GenerationMode.POSITIVE))]
    if operation.body:
        kinds.append(("negative", operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)))
    if label in ENGINE_ROUTES:
        served = ("served", served_schema[path][method].as_strategy(generation_mode=GenerationMode.POSITIVE))
        kinds += [served] * len(kinds)
    return st.one_of(*(cases.map(lambda case, kind=kind: (kind, case)) for kind, cases in kinds))


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz(label, api_schema, served_schema, hostile, target, watchers):
    cases = strategy(label, api_schema, served_schema)
    who = callers(label, hostile)
    roles, by_role = [c.role for c in who], {c.role: c for c in who}
    session = requests.Session()  # keep-alive, as clients do: an error must leave the connection usable
    tally: Counter[str] = Counter()  # how far the requests got: "kind, caller: status" -> cases

    # A fixed seed per operation (and run setting): reproducible, yet each operation draws differently.
    @seed(zlib.crc32(f"{SEED}:{label}".encode()))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])  # fmt: skip
    @given(kind_case=cases, data=st.data())
    def fuzz(kind_case, data):
        kind, case = kind_case
        if kind != "served":  # served cases name existing models already
            steer(case, kind, label, target, data)
        spare_the_witness(case, label)
        caller = by_role[data.draw(st.sampled_from(roles), label="caller")]  # a role, so that no report shows a key
        request = f"{caller.role}: {case.as_curl_command(headers=caller.headers(), base_url=hostile.url)}"
        note(request)
        t0 = time.perf_counter()
        try:
            response = case.call(base_url=hostile.url, session=session, headers=caller.headers(), timeout=CASE_TIMEOUT_S)
        except requests.RequestException as e:  # a timeout, or the connection dropped
            pytest.fail(f"{type(e).__name__} after {time.perf_counter() - t0:.1f} s: {request}\n"
                        f"server alive: {hostile.alive()}; its log: {hostile.log_path}")  # fmt: skip
        took = time.perf_counter() - t0
        tally[f"{kind}, {caller.role}: {response.status_code}"] += 1
        restore_deleted(case, label, response, hostile, target)
        found = problems(case, kind, caller, response, hostile)
        if took > CASE_TIMEOUT_S:
            found.append(f"answered in {took:.1f} s")
        if not hostile.alive():
            found.append(f"the server process died: {hostile.log_text()[-3000:]}")
        assert not found, f"{found}\n{request}\n-> {response.status_code} {response.text[:1000]}\nserver log: {hostile.log_path}"

    fuzz()
    print(f"{label}: {sum(tally.values())} cases; " + "; ".join(f"{k} x{n}" for k, n in sorted(tally.items())))  # pytest -rP shows it
    assert_nobody_else_hurt(*watchers, hostile)


def test_nobody_else_was_hurt(watchers, hostile):
    """Last: over the whole run, every public /health answered within a second and the witness tenant's
    stream never changed (each operation's test checks the same when it ends, to name the culprit)."""
    hw, w = watchers
    runs, deadline = w.runs, time.monotonic() + 60
    while w.runs == runs and not w.failures and time.monotonic() < deadline:  # a stream that saw the end of the run
        time.sleep(0.2)
    print(f"/health polls {hw.polls}, slowest {hw.slowest:.2f} s; witness streams {w.runs}")  # pytest -rP shows it
    assert w.runs > runs or w.failures, "the witness stream did not complete within 60 s"
    assert hw.polls > 0
    assert_nobody_else_hurt(hw, w, hostile)
