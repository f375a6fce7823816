"""The adapter registry through the admin API and the OpenAI API: tenants, uploads, isolation, validation, pins, deletes."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.service import build_adapter_service
from server.api.app import build_app
from server.api.limits import RequestLimits
from server.config import EngineConfig
from tests.conftest import LiveServer

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def reg_engine(model_dir):
    from server.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(quantization="none", lora_dtype="float32", model=model_dir, kv_cache_tokens=4096, max_lora_rank=32, served_model_name="smollm2"))


@pytest.fixture(scope="module")
def server(reg_engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    service = build_adapter_service(reg_engine, str(root / "store"), None, root / "cache", 1 << 30, 1 << 30)
    with LiveServer(build_app(reg_engine, api_key=ADMIN, adapter_service=service, limits=RequestLimits(max_adapter_bytes=24 * 2**20))) as srv:
        srv.admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
        srv.store_root = root / "store"
        for tenant in ("acme", "globex"):
            assert srv.admin.post("/admin/v1/tenants", json={"name": tenant}).status_code == 201
        srv.keys = {t: srv.admin.post(f"/admin/v1/tenants/{t}/keys").json()["key"] for t in ("acme", "globex")}
        yield srv


def files_of(adapter_dir) -> dict[str, bytes]:
    return {n: (adapter_dir / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def upload(srv, tenant, name, files=None, archive=None, archive_name="a.tar.gz", **fields):
    data = {"tenant": tenant, "name": name, **{k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}}
    parts = {"archive": (archive_name, archive)} if archive is not None else {k: (k, v) for k, v in files.items()}
    return srv.admin.post("/admin/v1/adapters", data=data, files=parts)


def client_for(srv, tenant):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key=srv.keys[tenant], max_retries=0, timeout=120)


def greedy(client, model, prompt="The capital of France is", n=12):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def test_upload_then_serve_equals_the_same_adapter_served_statically(server, adapter_dirs, engine):
    r = upload(server, "acme", "support", files_of(adapter_dirs["r8-all"]), description="support bot")
    assert r.status_code == 201, r.text
    m = r.json()
    assert (m["tenant"], m["name"], m["version"], m["family"]) == ("acme", "support", 1, "lora")
    assert m["ranks"]["q_proj"] == 8 and m["target_modules"] == sorted(m["ranks"]) and len(m["sha256"]) == 64
    acme = client_for(server, "acme")
    got = acme.completions.create(model="support", prompt="The capital of France is", max_tokens=12, temperature=0).choices[0].text
    # the session engine serves the very same files as a static adapter
    ids = engine.tokenizer("The capital of France is")["input_ids"]
    from server.engine.sequence import SamplingParams, Sequence

    seq = Sequence(ids, SamplingParams(max_tokens=12, temperature=0.0), "r8-all")
    engine.add(seq)
    while engine.has_work():
        engine.step()
    assert got == engine.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    detail = server.admin.get("/admin/v1/adapters/acme/support").json()
    assert detail["residency"] == {"device": True, "host": True, "disk": True, "store": True}


def test_archives_upload_as_tar_gz_and_zip(server, adapter_dirs):
    files = files_of(adapter_dirs["r4-qv"])
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"my-adapter/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert upload(server, "globex", "legal", archive=tgz.getvalue()).status_code == 201
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    r = upload(server, "globex", "legal-zip", archive=zbuf.getvalue(), archive_name="a.zip", public=True)
    assert r.status_code == 201 and r.json()["public"] is True


def test_tenants_see_and_use_only_their_own_and_public_adapters(server, adapter_dirs):
    if upload(server, "acme", "private-x", files_of(adapter_dirs["r2-mlp"])).status_code != 201:
        pytest.fail("upload failed")
    upload(server, "globex", "legal-zip-2", files_of(adapter_dirs["r4-qv"]), public=True)
    acme, globex = client_for(server, "acme"), client_for(server, "globex")
    acme_ids = {m.id for m in acme.models.list().data}
    assert {"smollm2", "support", "private-x", "globex/legal-zip-2"} <= acme_ids
    assert not any(i.startswith("acme/") or i == "legal" for i in acme_ids)
    globex_ids = {m.id for m in globex.models.list().data}
    assert "acme/private-x" not in globex_ids and "private-x" not in globex_ids
    # someone else's private adapter answers exactly like one that does not exist
    with pytest.raises(openai.NotFoundError) as hidden:
        globex.completions.create(model="acme/private-x", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        globex.completions.create(model="acme/no-such-adapter", prompt="hi", max_tokens=2)
    assert hidden.value.body["message"].replace("private-x", "X") == missing.value.body["message"].replace("no-such-adapter", "X")
    assert greedy(acme, "globex/legal-zip-2")  # public: usable by every tenant
    # tenant keys cannot use the admin API
    r = httpx.delete(server.base_url + "/admin/v1/adapters/acme/private-x", headers={"Authorization": f"Bearer {server.keys['globex']}"})
    assert r.status_code == 401
    assert server.admin.get("/admin/v1/adapters", params={"tenant": "acme"}).status_code == 200
    # a deleted key stops working
    key = server.admin.post("/admin/v1/tenants/acme/keys").json()
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key["key"], max_retries=0)
    assert c.models.list().data
    assert server.admin.delete(f"/admin/v1/tenants/acme/keys/{key['id']}").status_code == 204
    import time

    time.sleep(2.5)  # the key cache's TTL
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def _damaged(adapter_dirs, tmp_path, how):
    files = files_of(adapter_dirs["r8-all"])
    if how == "bad-json":
        files["adapter_config.json"] = b"{r: 8"
    elif how == "pickle":
        del files["adapter_model.safetensors"]
        files["adapter_model.bin"] = b"\x80\x04\x95 pickle"
    elif how == "truncated":
        files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:5000]
    elif how in ("shape", "target", "rank"):
        path = tmp_path / "w.safetensors"
        path.write_bytes(files["adapter_model.safetensors"])
        t = load_file(str(path))
        if how == "shape":
            k = next(k for k in t if "q_proj.lora_A" in k)
            t[k] = torch.zeros(8, 300)
        elif how == "target":
            t["base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight"] = torch.zeros(8, 576)
            t["base_model.model.model.layers.0.self_attn.rotary_emb.lora_B.weight"] = torch.zeros(576, 8)
        save_file(t, str(path))
        files["adapter_model.safetensors"] = path.read_bytes()
        if how == "rank":
            files = files_of(adapter_dirs["r32-q"])
            cfg = json.loads(files["adapter_config.json"])
            files["adapter_config.json"] = json.dumps(cfg).encode()
    return files


@pytest.mark.parametrize(
    "how, status",
    [("bad-json", 400), ("pickle", 400), ("truncated", 400), ("shape", 400), ("target", 400)],
)
def test_malformed_adapters_are_refused_and_nothing_is_stored(server, adapter_dirs, tmp_path, how, status):
    before = server.admin.get("/admin/v1/adapters").json()["data"]
    r = upload(server, "acme", f"bad-{how}", _damaged(adapter_dirs, tmp_path, how))
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert server.admin.get("/admin/v1/adapters").json()["data"] == before


def test_rank_above_the_server_limit_is_refused(reg_engine, model_dir, adapter_dirs, tmp_path):
    # the module server allows rank 32; this one allows 16
    service = build_adapter_service(reg_engine, str(tmp_path / "store"), None, tmp_path / "cache", 1 << 30, 1 << 30)
    reg_engine.config.max_lora_rank, old = 16, reg_engine.config.max_lora_rank
    try:
        with LiveServer(build_app(reg_engine, adapter_service=service)) as srv:
            c = httpx.Client(base_url=srv.base_url)
            assert c.post("/admin/v1/tenants", json={"name": "t"}).status_code == 201  # open mode: no key needed
            files = files_of(adapter_dirs["r32-q"])
            r = c.post("/admin/v1/adapters", data={"tenant": "t", "name": "big"}, files={k: (k, v) for k, v in files.items()})
            assert r.status_code == 400 and "max-lora-rank" in r.json()["error"]["message"]
    finally:
        reg_engine.config.max_lora_rank = old


def test_oversized_upload_is_413(server):
    big = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\0" * (25 * 2**20)}
    r = upload(server, "acme", "huge", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "adapter_too_large"


def test_archive_entries_escaping_the_directory_are_refused(server, adapter_dirs):
    files = files_of(adapter_dirs["r4-qv"])
    for evil in ("../adapter_config.json", "/etc/adapter_config.json"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(evil if name == "adapter_config.json" else name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        r = upload(server, "acme", "evil", archive=buf.getvalue())
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_archive", r.text
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        link = tarfile.TarInfo("adapter_model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert upload(server, "acme", "evil", archive=buf.getvalue()).status_code == 400


def test_duplicate_name_is_409_unless_a_new_version_is_asked_for(server, adapter_dirs):
    files = files_of(adapter_dirs["r12-ko"])
    assert upload(server, "acme", "dup", files).status_code == 201
    r = upload(server, "acme", "dup", files)
    assert r.status_code == 409
    r = upload(server, "acme", "dup", files_of(adapter_dirs["r16-attn"]), new_version=True)
    assert r.status_code == 201 and r.json()["version"] == 2
    acme = client_for(server, "acme")
    assert greedy(acme, "dup") == greedy(client_for(server, "acme"), "dup")


def test_unknown_tenant_and_invalid_names(server, adapter_dirs):
    files = files_of(adapter_dirs["r4-qv"])
    assert upload(server, "nobody", "x", files).status_code == 404
    assert upload(server, "acme", "Bad Name!", files).status_code == 400
    assert server.admin.post("/admin/v1/tenants", json={"name": "acme"}).status_code == 409


def test_delete_while_a_request_streams_finishes_the_request(server, adapter_dirs):
    assert upload(server, "acme", "ephemeral", files_of(adapter_dirs["r16-attn"])).status_code == 201
    headers = {"Authorization": f"Bearer {server.keys['acme']}"}
    body = {"model": "ephemeral", "prompt": "Count:", "max_tokens": 40, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, headers=headers, timeout=120) as r:
        lines = iter(r.iter_lines())
        first = next(line for line in lines if line.startswith("data: "))
        assert server.admin.delete("/admin/v1/adapters/acme/ephemeral").status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    assert first and rest[-1] == "data: [DONE]"
    finish = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in rest[:-1]]
    assert finish[-1] == "length"
    with pytest.raises(openai.NotFoundError):
        client_for(server, "acme").completions.create(model="ephemeral", prompt="x", max_tokens=1)
    assert server.admin.get("/admin/v1/adapters/acme/ephemeral").status_code == 404


def test_pin_and_unpin(server, adapter_dirs):
    assert upload(server, "globex", "pinned", files_of(adapter_dirs["r2-mlp"])).status_code == 201
    r = server.admin.post("/admin/v1/adapters/globex/pinned/pin")
    assert r.status_code == 200
    detail = server.admin.get("/admin/v1/adapters/globex/pinned").json()
    assert detail["pinned"] is True and detail["residency"]["device"] is True
    assert server.admin.post("/admin/v1/adapters/globex/pinned/unpin").status_code == 200
    assert server.admin.get("/admin/v1/adapters/globex/pinned").json()["pinned"] is False


def test_a_corrupt_object_is_never_served(server, adapter_dirs):
    r = upload(server, "acme", "to-corrupt", files_of(adapter_dirs["r12-ko"]))
    digest = r.json()["files"]["adapter_model.safetensors"]["sha256"]
    blob = next(server.store_root.rglob(digest))
    blob.write_bytes(b"garbage" + blob.read_bytes()[7:])
    with pytest.raises(openai.APIStatusError) as e:
        client_for(server, "acme").completions.create(model="to-corrupt", prompt="x", max_tokens=1)
    assert e.value.status_code == 503 and e.value.body["code"] == "adapter_corrupt"


def test_registry_metrics_are_exported(server):
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("hotswap_adapter_cache_hits_total", "hotswap_adapter_cache_misses_total", "hotswap_adapter_load_seconds", "hotswap_adapter_resident_bytes"):
        assert name in text, name


def test_cli_pushes_lists_and_removes_through_the_admin_api(server, adapter_dirs, capsys):
    from server.cli import main

    common = ["--url", server.base_url, "--admin-key", ADMIN]
    assert main(["tenants", "create", "initech", *common]) == 0
    assert main(["tenants", "key", "initech", *common]) == 0
    assert "hs-" in capsys.readouterr().out
    assert main(["adapters", "push", str(adapter_dirs["r4-qv"]), "--tenant", "initech", "--name", "cli-pushed", *common]) == 0
    assert "published initech/cli-pushed v1" in capsys.readouterr().out
    assert main(["adapters", "ls", "--tenant", "initech", *common]) == 0
    assert "initech/cli-pushed" in capsys.readouterr().out
    assert main(["adapters", "rm", "initech/cli-pushed", *common]) == 0
    assert server.admin.get("/admin/v1/adapters/initech/cli-pushed").status_code == 404
    with pytest.raises(SystemExit, match="401"):
        main(["adapters", "ls", "--url", server.base_url, "--admin-key", "wrong"])
