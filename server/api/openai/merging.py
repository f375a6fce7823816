"""The `adapters` extension of /v1/completions and /v1/chat/completions: several adapters merged per request.

    {"model": "<base model>", "adapters": [{"model": "support", "weight": 0.7}, {"model": "legal", "weight": 0.3}],
     "merge_strategy": "linear"}

LoRAX takes `adapter_id` or `merged_adapters`, never both; here `model` is required by the OpenAI
schema, so with `adapters` it must name the base model: the request runs on the base plus the merge,
and nothing else. Each member is resolved exactly like `model` (the caller's own adapters by bare name,
`tenant/name` for another tenant's public ones, runtime-loaded ones by bare name; missing and hidden are
both 404, naming `adapters.<i>.model`). The merge itself is server.adapters.stacking.
"""
from __future__ import annotations

from server.adapters.stacking import Member, check_strategy, member_param
from server.errors import HotswapError, InvalidRequest


async def resolve_merged(serving, model: str, raw, user: str | None, adapters, strategy: str | None) -> tuple[str, object, str]:
    """(engine key, host weights, prefix identity) of the request's merged adapters (OpenAIServing.resolve_adapter)."""
    if adapters is None:
        raise InvalidRequest("merge_strategy applies to several adapters: list them in `adapters`", param="merge_strategy")
    check_strategy("linear" if strategy is None else strategy)
    base = serving.engine.model_name
    if model != base:
        raise InvalidRequest(f"with `adapters`, `model` must be the base model `{base}`: list `{model[:80]}` in `adapters` instead",
                             param="model", code="model_with_adapters")  # fmt: skip
    service = serving.adapter_service
    if service is None:
        raise InvalidRequest("this server runs without an adapter registry: it cannot merge adapters", param="adapters")
    principal = serving.principal(raw)
    members = []
    for i, member in enumerate(adapters):
        if member.model == base or member.model in serving.engine.static_adapters:
            raise InvalidRequest(f"`{member.model[:80]}` is not a registry adapter: only registry adapters can be merged", param=member_param(i))
        try:
            manifest = await service.resolve(principal, member.model)
        except HotswapError as e:
            e.param = member_param(i)
            raise
        members.append(Member(manifest, member.weight, member.model))
    return await service.for_stack(members, user, serving.engine_limits.max_lora_rank)
