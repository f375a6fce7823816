"""The registry of adapter families and pool spaces: every module of `server.families` that defines
`FAMILY` (and `SPACE`) is one. Detection, parsing, the adapter manager and the model runner consult
it; nothing switches on a family's name.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

import server.families as package
from server.families.base import Family, ParseContext, PoolSpace
from server.lora.config_schema import FamilyTag
from server.lora.peft import CONFIG_FILE, AdapterError, parse_adapter_config
from server.models.config import ModelConfig


def _discover() -> tuple[dict[str, Family], dict[str, PoolSpace]]:
    families: dict[str, Family] = {}
    spaces: dict[str, PoolSpace] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name in ("base", "registry"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, Family):
            continue  # a helper module (a file format, a converter, a generator)
        assert family.name not in families, f"two families are named {family.name!r}"
        families[family.name] = family
        if (space := getattr(module, "SPACE", None)) is not None:
            assert space.name not in spaces, f"two pool spaces are named {space.name!r}"
            spaces[space.name] = space
    return families, spaces


FAMILIES, SPACES = _discover()


def family_named(name: str) -> Family:
    """The family a manifest or a client names (AdapterError if there is none)."""
    family = FAMILIES.get(name)
    if family is None:
        raise AdapterError(f"adapter family {name!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    return family


def detect_family(files: dict[str, bytes], name: str) -> Family:
    """The one family whose `claims` accepts the adapter's config."""
    if CONFIG_FILE not in files:
        raise AdapterError(f"{name}: {CONFIG_FILE} is missing")
    tag = parse_adapter_config(files[CONFIG_FILE], name, FamilyTag)
    found = [f for f in FAMILIES.values() if f.claims(tag)]
    if not found:
        kind = tag.hotswap_family or tag.peft_type + (" with use_dora" if tag.use_dora else "")
        raise AdapterError(f"{name}: adapter type {kind!r} is not supported (supported families: {', '.join(sorted(FAMILIES))})")
    assert len(found) == 1, f"families {[f.name for f in found]} all claim {name}"
    return found[0]


def parse_adapter(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int,
                  family: str | None = None, base_weight=None):  # fmt: skip
    """The adapter's weights, as its family parses them; `family`, when given, must be what the files are.
    `base_weight(layer, module)` gives the dense base weights to families whose math needs them."""
    found = detect_family(files, name)
    if family is not None and family != found.name:
        raise AdapterError(f"{name}: the files are a {found.name} adapter, not {family}")
    return found.parse(files, name, ParseContext(model_cfg, dtype, max_rank, base_weight))
