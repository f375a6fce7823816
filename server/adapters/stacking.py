"""Several adapters in one request: a LoRAX-style `linear` merge, served exactly as ONE rank-stacked LoRA.

A request's `adapters: [{"model": m_i, "weight": w_i}, ...]` asks for the update

    ΔW = Σ_i w_i · s_i · B_i A_i        (s_i: member i's own alpha/r, or alpha/√r with rsLoRA)

on every module some member adapts. It is built once per combination by stacking ranks
(server.lora.stack: A = [A_1; A_2; ...], B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]), so the stacked adapter
computes exactly that sum — no averaging of A's and B's separately, which is what LoRAX's own `linear`
strategy does (its cross terms w_i w_j B_i A_j make it approximate, and it needs equal ranks). Members
may differ in rank and in target modules; the stacked rank on a module is the sum of its members'
ranks there and must fit the server's --max-lora-rank.

Each member is resolved like `model` (the caller's tenant rights: missing and hidden are both 404) and
brought to host RAM through the adapter service's tiers. Members must be LoRA-expressible: plain LoRA,
or RecLoRA, whose per-user mixture ΔW_u = (Σ_k w_k B_k)(Σ_k w_k A_k) is a LoRA once made for the request's
`user`. Routed experts, S²FT slabs and DoRA's normalisation are not a sum of B A products: 400.

The stacked adapter is an ordinary LoRA to the engine: its key is `stack:<digest>`, cached in the host
tier and placed in the LoRA pools like any other, and served in the same batches. The digest covers the
members' content identities (file sha256, and the user state for RecLoRA) and their weights, in a
canonical order, so the prefix cache shares KV only between requests computing the same update, and a
name deleted and uploaded again with other contents gets a new stack. `StackIndex` remembers which
stacks hold which adapter so that deleting an adapter drops its stacks from every tier too.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters_store import AdapterManifest
from server import errors
from server.lora.peft import AdapterError, LoraWeights, cast_weight
from server.lora.stack import fused_ranks, stack_lora_modules

MAX_MEMBERS = 8
MAX_ABS_WEIGHT = 16.0  # |w_i|: enough for task arithmetic (negative weights subtract a task), bounded against overflow
MERGE_STRATEGIES = ("linear",)
UNSUPPORTED_STRATEGIES = ("ties", "dare_linear", "dare_ties")  # LoRAX's others: they are not exact sums of B A
STACKABLE_FAMILIES = frozenset({"lora", "reclora"})  # RecLoRA: its per-user mixture is one LoRA
KEY_PREFIX = "stack:"


@dataclass(frozen=True, slots=True)
class Member:
    manifest: AdapterManifest
    weight: float
    ref: str  # as the client named it, for messages


def member_param(i: int) -> str:
    return f"adapters.{i}.model"


def check_strategy(strategy: str) -> None:
    if strategy in MERGE_STRATEGIES:
        return
    if strategy in UNSUPPORTED_STRATEGIES:
        raise errors.InvalidRequest(f"merge_strategy {strategy!r} is not supported: this server merges adapters exactly with \"linear\" only",
                                    param="merge_strategy", code="unsupported_merge_strategy")  # fmt: skip
    raise errors.InvalidRequest(f"unknown merge_strategy {strategy[:64]!r}: use \"linear\"", param="merge_strategy")


def check_member_family(member: Member, i: int) -> None:
    family = member.manifest.family
    if family not in STACKABLE_FAMILIES:
        raise errors.InvalidRequest(
            f"adapter `{member.ref}` is a {family} adapter: only LoRA adapters (and RecLoRA, made per user) can be merged into one "
            "LoRA; serve it alone with `model`", param=member_param(i), code="adapter_not_mergeable",
        )  # fmt: skip


def identity_of(parts: Sequence[tuple[str, float]]) -> str:
    """The stack's content identity: its members' identities and weights, whatever order the client gave."""
    canonical = sorted((identity, float(weight).hex()) for identity, weight in parts)
    return hashlib.sha256(json.dumps(canonical).encode()).hexdigest()


def build_stacked(key: str, loras: list[LoraWeights], weights: list[float], dtype: torch.dtype, max_rank: int) -> LoraWeights:
    """One LoRA named `key` computing Σ_i weights[i] s_i B_i A_i, in `dtype` (InvalidRequest if its rank is too high)."""
    ranks = fused_ranks(loras)
    worst = max(ranks.values(), default=0)
    if worst > max_rank:
        layer, module = next(k for k in sorted(ranks) if ranks[k] == worst)
        raise errors.InvalidRequest(
            f"the adapters' ranks stack to {worst} (layer {layer} {module}), above this server's maximum LoRA rank {max_rank} "
            "(--max-lora-rank): merge fewer adapters or adapters of lower rank", param="adapters", code="rank_overflow",
        )  # fmt: skip
    out = LoraWeights(name=key, rank=worst)
    for (layer, module), (a, b) in stack_lora_modules(loras, weights).items():
        what = f"the merged adapters at layer {layer} {module}"
        try:
            out.modules[(layer, module)] = (cast_weight(a, dtype, f"{what} lora_A"), cast_weight(b, dtype, f"{what} lora_B"), 1.0)
        except AdapterError as e:  # a weight large enough to overflow the serving dtype
            raise errors.InvalidRequest(e.message + " (lower the weights)", param="adapters") from None
    return out


class StackIndex:
    """Which stacked keys hold which adapter (by keys_prefix: every version, every user copy)."""

    def __init__(self) -> None:
        self._by_prefix: dict[str, set[str]] = {}

    def add(self, key: str, member_prefixes: Sequence[str]) -> None:
        for prefix in member_prefixes:
            self._by_prefix.setdefault(prefix, set()).add(key)

    def pop(self, prefix: str) -> set[str]:
        """The stacks holding the adapter under `prefix`, forgotten here (the caller drops them from the tiers)."""
        keys = self._by_prefix.pop(prefix, set())
        for others in self._by_prefix.values():
            others -= keys
        return keys


async def stacked_for_request(service, members: list[Member], user: str | None, max_rank: int) -> tuple[str, LoraWeights, str]:
    """(engine key, host weights, prefix identity) of the stacked adapter for these members (AdapterService.for_stack)."""
    from server.adapters.service import keys_prefix

    for i, member in enumerate(members):
        check_member_family(member, i)
    resolved = [await service.for_request(m.manifest, user) for m in members]  # each through the host tier
    # one canonical order (by identity, then weight), so the stack's bits do not depend on the client's order
    order = sorted(range(len(members)), key=lambda i: (resolved[i][2], float(members[i].weight).hex()))
    resolved, members = [resolved[i] for i in order], [members[i] for i in order]
    digest = identity_of([(identity, m.weight) for (_, _, identity), m in zip(resolved, members)])
    key, identity = f"{KEY_PREFIX}{digest[:32]}", f"{KEY_PREFIX}{digest}"
    cached = service.host.get(key)
    if cached is not None:
        return key, cached, identity
    loras = []
    for i, ((_, weights, _), member) in enumerate(zip(resolved, members)):
        if not isinstance(weights, LoraWeights) or weights.family != "lora" or weights.magnitudes:
            raise errors.InvalidRequest(f"adapter `{member.ref}` is not a plain LoRA here: it cannot be merged", param=member_param(i),
                                        code="adapter_not_mergeable")  # fmt: skip
        loras.append(weights)
    dtype = loras[0].modules[next(iter(loras[0].modules))][0].dtype
    stacked = await asyncio.to_thread(build_stacked, key, loras, [m.weight for m in members], dtype, max_rank)
    service.host.put(key, stacked)
    service.stacks.add(key, [keys_prefix(m.manifest.tenant, m.manifest.name) for m in members])
    return key, stacked, identity


async def drop_stacks(service, engine, prefix: str) -> None:
    """An adapter was deleted: drop every stack made with it from the host tier and the device pools."""
    for key in service.stacks.pop(prefix):
        service.host.drop(key)
        await engine.evict(key)
