"""The HTTP layer talks to the engine through one narrow object (server.engine.client) and nothing else.

Engine internals (the scheduler, the adapter manager, families, the model, kernels, torch) may change
freely as long as the client keeps its promises; this test fails when an API module reaches past it.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API_MODULES = sorted((ROOT / "server" / "api").rglob("*.py")) + [ROOT / "server" / "auth.py"]
INTERNALS = ("server.engine", "server.lora", "server.families", "server.models", "server.layers", "kernels", "torch", "transformers")
ALLOWED = ("server.engine.client",)
# names that only the client may use to reach the engine behind it
PRIVATE_ATTRIBUTES = {"_engine", "_async", "adapters", "scheduler", "block_manager", "tokenizer", "runner"}


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _reaches_internals(module: str) -> bool:
    if module in ALLOWED:
        return False
    return any(module == p or module.startswith(p + ".") for p in INTERNALS)


def test_the_api_imports_nothing_of_the_engine_but_its_client():
    offenders = {
        str(path.relative_to(ROOT)): bad
        for path in API_MODULES
        if (bad := [m for m in _imports(ast.parse(path.read_text())) if _reaches_internals(m)])
    }
    assert not offenders, f"API modules importing engine internals: {offenders}"


def test_the_api_touches_no_engine_internals_through_attributes():
    offenders = {
        str(path.relative_to(ROOT)): sorted({n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute) and n.attr in PRIVATE_ATTRIBUTES})
        for path in API_MODULES
    }
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_the_check_itself_catches_an_internal_import():
    assert _reaches_internals("server.engine.scheduler") and _reaches_internals("torch.nn")
    assert not _reaches_internals("server.engine.client") and not _reaches_internals("server.enginex")
