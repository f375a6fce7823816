"""`hotswap adapters ...`, `hotswap tenants ...` (create, key, show, set) and `hotswap sglora ...`: a small client of the admin API."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import uuid
from pathlib import Path

import httpx
from tqdm import tqdm

from server.console import CliError

CHUNK = 256 * 1024
UNLIMITED = "unlimited"
QUOTA_FLAGS = ("max_concurrent_requests", "requests_per_minute", "tokens_per_minute")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number greater than 0, got {text!r}")
    return value


def _quota(text: str) -> int | str:
    """A positive integer, or `unlimited` (also `none`) to remove the quota."""
    if text.lower() in (UNLIMITED, "none"):
        return UNLIMITED
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or '{UNLIMITED}', got {text!r}")
    return value


def add_admin_commands(sub: argparse._SubParsersAction) -> None:
    def common(p):
        p.add_argument("--url", default=os.environ.get("HOTSWAP_URL", "http://127.0.0.1:8000"), help="server address (env HOTSWAP_URL)")
        p.add_argument("--admin-key", default=os.environ.get("HOTSWAP_ADMIN_KEY"), help="admin key (env HOTSWAP_ADMIN_KEY)")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server's answer")

    adapters = sub.add_parser("adapters", help="manage adapters in the registry").add_subparsers(dest="action", required=True)
    push = adapters.add_parser("push", help="upload a PEFT adapter directory")
    push.add_argument("dir", type=Path)
    push.add_argument("--tenant", required=True)
    push.add_argument("--name", required=True)
    push.add_argument("--description", default="")
    push.add_argument("--public", action="store_true", help="every tenant may use it")
    push.add_argument("--new-version", action="store_true", help="add a version to an existing name")
    ls = adapters.add_parser("ls", help="list adapters")
    ls.add_argument("--tenant", default=None)
    rm = adapters.add_parser("rm", help="delete an adapter (all versions)")
    rm.add_argument("ref", help="TENANT/NAME")
    for p in (push, ls, rm):
        common(p)

    tenants = sub.add_parser("tenants", help="manage tenants and their API keys").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant")
    create.add_argument("name")
    key = tenants.add_parser("key", help="create an API key for a tenant (shown once)")
    key.add_argument("tenant")
    show = tenants.add_parser("show", help="a tenant's keys (ids only), weight and quotas")
    show.add_argument("tenant")
    setting = tenants.add_parser(
        "set", help="change a tenant's weight and quotas (they apply to its next request)",
        description="Change a tenant's weight and quotas; they apply to its next request, without a restart. "
                    "Quotas are counted per server process over a sliding minute; requests over one get HTTP 429 with Retry-After.",
    )  # fmt: skip
    setting.add_argument("tenant")
    setting.add_argument("--weight", type=_positive_float, default=None, help="its share of the batch under fair scheduling, relative to other tenants' (default 1)")
    setting.add_argument("--max-concurrent-requests", type=_quota, default=None, metavar="N|unlimited", help="requests in flight at once")
    setting.add_argument("--requests-per-minute", type=_quota, default=None, metavar="N|unlimited", help="requests accepted per minute")
    setting.add_argument("--tokens-per-minute", type=_quota, default=None, metavar="N|unlimited", help="prompt + completion tokens per minute")
    for p in (create, key, show, setting):
        common(p)

    sglora = sub.add_parser("sglora", help="SG-LoRA: fit generators, generate adapters from descriptions").add_subparsers(dest="action", required=True)
    fit = sglora.add_parser("fit", help="fit a cvae generator on a tenant's expert adapters (stored in the registry)")
    fit.add_argument("--tenant", required=True)
    fit.add_argument("--name", default="cvae", help="the generator's name (default: cvae, the one generate uses by default)")
    fit.add_argument("--experts", nargs="+", default=None, metavar="REF", help="TENANT/NAME or NAME of each expert (default: every LoRA with a description the tenant may use)")
    fit.add_argument("--epochs", type=int, default=2000)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--basis-rank", type=int, default=32, help="shared basis size per module (1-64)")
    fit.add_argument("--rank", type=int, default=None, help="rank of the generated adapters (default: the experts' largest, at most --basis-rank)")
    fit.add_argument("--latent-dim", type=int, default=8)
    fit.add_argument("--new-version", action="store_true", help="add a version to an existing generator")
    gen = sglora.add_parser("generate", help="generate an adapter from a task description")
    gen.add_argument("--tenant", required=True)
    gen.add_argument("--name", required=True, help="the new adapter's name")
    gen.add_argument("--description", required=True)
    gen.add_argument("--generator", default="cvae", choices=["cvae", "fusion"])
    gen.add_argument("--generator-ref", default=None, help="cvae: NAME or TENANT/NAME[@vN] (default: TENANT/cvae)")
    gen.add_argument("--seed", type=int, default=0, help="cvae: 0 decodes the most likely adapter, others sample")
    gen.add_argument("--top-k", type=int, default=None, help="fusion: experts to fuse (default 3)")
    gen.add_argument("--public", action="store_true")
    gen.add_argument("--new-version", action="store_true")
    gls = sglora.add_parser("ls", help="list fitted generators")
    gls.add_argument("--tenant", default=None)
    grm = sglora.add_parser("rm", help="delete a fitted generator (all versions)")
    grm.add_argument("ref", help="TENANT/NAME")
    for p in (fit, gen, gls, grm):
        common(p)


def _client(args: argparse.Namespace) -> httpx.Client:
    if args.admin_key and not (args.admin_key.isascii() and args.admin_key.isprintable()):
        raise CliError("the admin key must be printable ASCII (it travels in an HTTP header): check HOTSWAP_ADMIN_KEY (or --admin-key)")
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    # A dead address should fail fast; an upload or a cold listing may take long.
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 10.0))
    return httpx.Client(base_url=args.url, headers=headers, timeout=timeout)


def _one_line(text: str, limit: int = 200) -> str:
    """A server's error text (maybe an HTML page) squeezed into one short line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check(resp: httpx.Response, args: argparse.Namespace, *fields: str) -> dict:
    """The JSON object a successful call answered, holding `fields`; CliError for anything else."""
    if resp.status_code == 401:
        if args.admin_key:
            raise CliError("the server refused the admin key (HTTP 401): set HOTSWAP_ADMIN_KEY (or --admin-key) to the key the server was started with")
        raise CliError("the server needs an admin key (HTTP 401): set HOTSWAP_ADMIN_KEY (or --admin-key) to the server's --admin-key")
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):  # not hotswap's error body: show what came
            message = resp.text or resp.reason_phrase
        raise CliError(f"the server answered HTTP {resp.status_code}: {_one_line(str(message))}")
    if not resp.content and not fields:
        return {}
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or any(f not in body for f in fields):
        kind = resp.headers.get("content-type", "no content type")
        raise CliError(f"{args.url} answered HTTP {resp.status_code} ({kind}) but not as the hotswap admin API does: is --url (or HOTSWAP_URL) a hotswap server?")
    return body


def _archive(directory: Path) -> bytes:
    files = [directory / "adapter_config.json", directory / "adapter_model.safetensors"]
    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory: push takes a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        hint = "; a pickled adapter_model.bin is never loaded: convert it to safetensors" if (directory / "adapter_model.bin").exists() else ""
        raise CliError(f"{directory} lacks {', '.join(missing)} (a PEFT LoRA directory, as saved by save_pretrained){hint}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    return buf.getvalue()


def _multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[str, list[bytes]]:
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="archive"; filename="{filename}"\r\nContent-Type: application/gzip\r\n\r\n'.encode()
    return boundary, [head, data, f"\r\n--{boundary}--\r\n".encode()]


def run_admin_command(args: argparse.Namespace) -> int:
    """Run one `adapters ...` / `tenants ...` command: 0 on success. What the user can fix (an
    unreachable or wrong server, a refused key, a missing directory) raises CliError."""
    try:
        with _client(args) as client:
            _run(client, args)
    except httpx.TimeoutException as e:
        raise CliError(f"{args.url} did not answer within {args.timeout:g} s ({type(e).__name__}): check --url (or HOTSWAP_URL), or raise --timeout") from e
    except httpx.ConnectError as e:
        raise CliError(f"cannot connect to a hotswap server at {args.url} ({e}): start one with `hotswap serve`, or point --url (or HOTSWAP_URL) at it") from e
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
        raise CliError(f"--url {args.url!r} is not an http(s) address ({e})") from e
    except httpx.HTTPError as e:  # the connection broke, or the server spoke something else than HTTP
        raise CliError(f"talking to {args.url} failed ({type(e).__name__}: {str(e) or 'no details'}): check --url (or HOTSWAP_URL)") from e
    return 0


def _run(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.command == "sglora":
        _run_sglora(client, args)
    elif args.command == "tenants" and args.action == "create":
        print(json.dumps(_check(client.post("/admin/v1/tenants", json={"name": args.name}), args), indent=2))
    elif args.command == "tenants" and args.action == "key":
        body = _check(client.post(f"/admin/v1/tenants/{args.tenant}/keys"), args, "id", "tenant", "key")
        print(f"key id {body['id']} for tenant {body['tenant']} (shown once, store it now):\n{body['key']}")
    elif args.command == "tenants" and args.action == "show":
        print(json.dumps(_check(client.get(f"/admin/v1/tenants/{args.tenant}"), args, "name", "keys"), indent=2))
    elif args.command == "tenants" and args.action == "set":
        changes: dict = {} if args.weight is None else {"weight": args.weight}
        for flag in QUOTA_FLAGS:
            value = getattr(args, flag)
            if value is not None:
                changes[flag] = None if value == UNLIMITED else value
        if not changes:
            raise CliError("nothing to change: give --weight, --max-concurrent-requests, --requests-per-minute or --tokens-per-minute")
        print(json.dumps(_check(client.patch(f"/admin/v1/tenants/{args.tenant}", json=changes), args, "name", "weight"), indent=2))
    elif args.action == "push":
        data = _archive(args.dir)
        fields = {"tenant": args.tenant, "name": args.name, "description": args.description,
                  "public": str(args.public).lower(), "new_version": str(args.new_version).lower()}
        boundary, parts = _multipart(fields, f"{args.name}.tar.gz", data)
        total = sum(len(p) for p in parts)

        def body():
            # The bar starts with the upload (not before a refused connection), and only on a terminal.
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading {args.name}", file=sys.stderr, disable=None) as bar:
                for part in parts:
                    for i in range(0, len(part), CHUNK):
                        chunk = part[i : i + CHUNK]
                        bar.update(len(chunk))
                        yield chunk

        resp = client.post("/admin/v1/adapters", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(total)})
        m = _check(resp, args, "tenant", "name", "version", "bytes", "ranks")
        print(f"published {m['tenant']}/{m['name']} v{m['version']} ({m['bytes']} bytes, ranks {m['ranks']})")
    elif args.action == "ls":
        rows = _check(client.get("/admin/v1/adapters", params={"tenant": args.tenant} if args.tenant else None), args, "data")["data"]
        print(f"{'ADAPTER':40} {'VERSION':>7} {'FAMILY':8} {'BYTES':>12} PUBLIC")
        for m in rows:
            print(f"{m['tenant'] + '/' + m['name']:40} {m['version']:>7} {m['family']:8} {m['bytes']:>12} {m['public']}")
    elif args.action == "rm":
        tenant, _, name = args.ref.partition("/")
        if not tenant or not name:
            raise CliError(f"name the adapter as TENANT/NAME (e.g. acme/support), not {args.ref!r}")
        body = _check(client.delete(f"/admin/v1/adapters/{tenant}/{name}"), args, "deleted", "versions")
        print(f"deleted {body['deleted']} ({body['versions']} versions)")


def _run_sglora(client: httpx.Client, args: argparse.Namespace) -> None:
    if args.action == "fit":
        body = {"tenant": args.tenant, "name": args.name, "epochs": args.epochs, "seed": args.seed, "basis_rank": args.basis_rank,
                "latent_dim": args.latent_dim, "new_version": args.new_version}  # fmt: skip
        if args.experts:
            body["experts"] = args.experts
        if args.rank is not None:
            body["rank"] = args.rank
        m = _check(client.post("/admin/v1/generators:fit", json=body), args, "tenant", "name", "version", "bytes", "metadata")
        meta = m["metadata"] if isinstance(m["metadata"], dict) else {}
        fit = meta.get("fit") if isinstance(meta.get("fit"), dict) else {}
        print(f"fitted generator {m['tenant']}/{m['name']} v{m['version']} on {len(meta.get('experts') or [])} experts in "
              f"{fit.get('seconds', '?')} s ({m['bytes']} bytes, rank {meta.get('rank', '?')}, basis keeps "
              f"{fit.get('energy_captured', '?')} of the experts' squared norm)")  # fmt: skip
    elif args.action == "generate":
        body = {"tenant": args.tenant, "name": args.name, "description": args.description, "generator": args.generator,
                "seed": args.seed, "public": args.public, "new_version": args.new_version}  # fmt: skip
        if args.generator_ref is not None:
            body["generator_ref"] = args.generator_ref
        if args.top_k is not None:
            body["top_k"] = args.top_k
        m = _check(client.post("/admin/v1/adapters:generate", json=body), args, "tenant", "name", "version", "bytes", "ranks")
        print(f"generated {m['tenant']}/{m['name']} v{m['version']} ({m['bytes']} bytes, ranks {m['ranks']})")
    elif args.action == "ls":
        rows = _check(client.get("/admin/v1/generators", params={"tenant": args.tenant} if args.tenant else None), args, "data")["data"]
        print(f"{'GENERATOR':40} {'VERSION':>7} {'FORMAT':16} {'EXPERTS':>7} {'BYTES':>12}")
        for m in rows:
            experts = len((m.get("metadata") or {}).get("experts") or [])
            print(f"{m['tenant'] + '/' + m['name']:40} {m['version']:>7} {m['format']:16} {experts:>7} {m['bytes']:>12}")
    elif args.action == "rm":
        tenant, _, name = args.ref.partition("/")
        if not tenant or not name:
            raise CliError(f"name the generator as TENANT/NAME (e.g. acme/cvae), not {args.ref!r}")
        body = _check(client.delete(f"/admin/v1/generators/{tenant}/{name}"), args, "deleted", "versions")
        print(f"deleted generator {body['deleted']} ({body['versions']} versions)")
