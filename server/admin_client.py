"""`hotswap adapters ...` and `hotswap tenants ...`: a small client of the admin API."""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import uuid
from pathlib import Path

import httpx
from tqdm import tqdm

CHUNK = 256 * 1024


def add_admin_commands(sub) -> None:
    def common(p):
        p.add_argument("--url", default=os.environ.get("HOTSWAP_URL", "http://127.0.0.1:8000"), help="server address (env HOTSWAP_URL)")
        p.add_argument("--admin-key", default=os.environ.get("HOTSWAP_ADMIN_KEY"), help="admin key (env HOTSWAP_ADMIN_KEY)")

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
    for p in (create, key):
        common(p)


def _client(args) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=300)


def _check(resp: httpx.Response) -> dict:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise SystemExit(f"hotswap: {resp.status_code} {message}")
    return resp.json() if resp.content else {}


def _archive(directory: Path) -> bytes:
    files = [directory / "adapter_config.json", directory / "adapter_model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"hotswap: {directory} lacks {', '.join(missing)} (a PEFT LoRA directory, as saved by save_pretrained)")
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


def run_admin_command(args) -> int:
    with _client(args) as client:
        if args.command == "tenants" and args.action == "create":
            print(json.dumps(_check(client.post("/admin/v1/tenants", json={"name": args.name})), indent=2))
        elif args.command == "tenants" and args.action == "key":
            body = _check(client.post(f"/admin/v1/tenants/{args.tenant}/keys"))
            print(f"key id {body['id']} for tenant {body['tenant']} (shown once, store it now):\n{body['key']}")
        elif args.action == "push":
            data = _archive(args.dir)
            fields = {"tenant": args.tenant, "name": args.name, "description": args.description,
                      "public": str(args.public).lower(), "new_version": str(args.new_version).lower()}
            boundary, parts = _multipart(fields, f"{args.name}.tar.gz", data)
            total = sum(len(p) for p in parts)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"uploading {args.name}", file=sys.stderr)

            def body():
                for part in parts:
                    for i in range(0, len(part), CHUNK):
                        chunk = part[i : i + CHUNK]
                        bar.update(len(chunk))
                        yield chunk

            resp = client.post("/admin/v1/adapters", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(total)})
            bar.close()
            m = _check(resp)
            print(f"published {m['tenant']}/{m['name']} v{m['version']} ({m['bytes']} bytes, ranks {m['ranks']})")
        elif args.action == "ls":
            rows = _check(client.get("/admin/v1/adapters", params={"tenant": args.tenant} if args.tenant else None))["data"]
            print(f"{'ADAPTER':40} {'VERSION':>7} {'FAMILY':8} {'BYTES':>12} PUBLIC")
            for m in rows:
                print(f"{m['tenant'] + '/' + m['name']:40} {m['version']:>7} {m['family']:8} {m['bytes']:>12} {m['public']}")
        elif args.action == "rm":
            tenant, _, name = args.ref.partition("/")
            if not name:
                raise SystemExit("hotswap: name the adapter as TENANT/NAME")
            body = _check(client.delete(f"/admin/v1/adapters/{tenant}/{name}"))
            print(f"deleted {body['deleted']} ({body['versions']} versions)")
    return 0
