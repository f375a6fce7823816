"""The S²FT adapter file format: sparse row / column deltas of a Llama-family model's linear weights.

S²FT (structured sparse fine-tuning) changes only selected output rows or input columns of some linear
weights W [d_out, d_in] (y = x Wᵀ). An adapter directory holds

* ``adapter_config.json``::

      {"peft_type": "S2FT", "hotswap_family": "s2ft", "format_version": 1,
       "base_model_name_or_path": "...", "target_modules": ["down_proj", "v_proj"]}

  ``target_modules`` is the sorted list of module names that have a delta in some layer.

* ``adapter_model.safetensors`` with, per changed module (``{key}`` = ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
  or ``model.layers.{i}.mlp.{gate,up,down}_proj``), exactly one of

  - a row delta: ``{key}.s2_row_indices`` int32 [k] (sorted, unique output rows) and ``{key}.s2_row_delta``
    [k, d_in] = W_ft[rows, :] - W_base[rows, :]
  - a column delta: ``{key}.s2_col_indices`` int32 [k] (sorted, unique input columns) and ``{key}.s2_col_delta``
    [d_out, k] = W_ft[:, cols] - W_base[:, cols]

Deltas are floating point, normally in the checkpoint's dtype. The converter may store a module's delta in a
wider dtype (float32 for a bfloat16/float16 checkpoint, float64 for a float32 one) where the checkpoint's dtype
cannot express ``base + delta == finetuned`` bit-exactly; `apply_s2ft_delta` is the merge rule that is exact
for both: add in the delta's dtype, round once to the weight's dtype.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save as safetensors_save

from server.lora.config_schema import S2FTConfig, brief
from server.lora.peft import AdapterError, load_tensors, parse_adapter_config
from server.models.modules import ADAPTER_MODULES, module_parent, module_path

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_TYPE, FAMILY, FORMAT_VERSION = "S2FT", "s2ft", 1
S2FT_MODULES = ADAPTER_MODULES

# layer numbers without leading zeros, so one module cannot be spelled twice, and short enough for int()
_KEY = re.compile(r"^model\.layers\.(0|[1-9][0-9]{0,8})\.(self_attn|mlp)\.(\w+)\.s2_(row|col)_(indices|delta)$")


@dataclass(slots=True)
class S2FTModuleDelta:
    """One module's sparse delta. ``kind == "row"``: delta [k, d_in] for output rows ``indices``;
    ``kind == "col"``: delta [d_out, k] for input columns ``indices``. ``indices`` are int64, sorted, unique."""

    kind: Literal["row", "col"]
    indices: torch.Tensor
    delta: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def num_bytes(self) -> int:
        return self.delta.nbytes + self.indices.numel() * 4  # indices are stored as int32


def s2ft_key(layer: int, module: str) -> str:
    """``model.layers.{layer}.self_attn.v_proj`` / ``model.layers.{layer}.mlp.down_proj``."""
    if module not in S2FT_MODULES:
        raise ValueError(f"unknown S2FT module {module!r} (supported: {', '.join(S2FT_MODULES)})")
    return module_path(int(layer), module)


def _check_indices(idx: torch.Tensor, what: str) -> None:
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"{what}: indices must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}")
    if idx.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"{what}: indices must be integers, got {idx.dtype}")
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{what}: indices must be sorted and unique")


def save_s2ft_adapter(out_dir, deltas: dict[tuple[int, str], S2FTModuleDelta], base_model: str) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (created if needed;
    both files are replaced atomically)."""
    if not deltas:
        raise ValueError("an S2FT adapter needs at least one module delta")
    tensors: dict[str, torch.Tensor] = {}
    for (layer, module), d in sorted(deltas.items()):
        key = s2ft_key(layer, module)
        what = f"layer {layer} {module}"
        if d.kind not in ("row", "col"):
            raise ValueError(f"{what}: kind must be 'row' or 'col', got {d.kind!r}")
        _check_indices(d.indices, what)
        if not d.delta.is_floating_point() or d.delta.dim() != 2:
            raise ValueError(f"{what}: delta must be a 2-D floating point tensor")
        k_axis = 0 if d.kind == "row" else 1
        if d.delta.shape[k_axis] != d.indices.numel():
            raise ValueError(f"{what}: {d.kind} delta {tuple(d.delta.shape)} does not fit k={d.indices.numel()} indices")
        if int(d.indices.min()) < 0 or int(d.indices.max()) > torch.iinfo(torch.int32).max:
            raise ValueError(f"{what}: indices out of the int32 range")
        tensors[f"{key}.s2_{d.kind}_indices"] = d.indices.detach().to("cpu", torch.int32).contiguous()
        tensors[f"{key}.s2_{d.kind}_delta"] = d.delta.detach().to("cpu").contiguous()
    config = {
        "peft_type": PEFT_TYPE,
        "hotswap_family": FAMILY,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": str(base_model),
        "target_modules": sorted({module for _, module in deltas}),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_FILE, safetensors_save(tensors, metadata={"format": "pt", "hotswap_family": FAMILY}))
    _atomic_write(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_s2ft_config(raw: bytes, name: str) -> S2FTConfig:
    cfg = parse_adapter_config(raw, name, S2FTConfig)
    if cfg.peft_type != PEFT_TYPE:
        raise AdapterError(f"{name}: peft_type {cfg.peft_type!r} is not an S2FT adapter (expected {PEFT_TYPE!r})")
    if cfg.hotswap_family != FAMILY:
        raise AdapterError(f"{name}: hotswap_family {cfg.hotswap_family!r} is not {FAMILY!r}")
    if cfg.format_version != FORMAT_VERSION:
        raise AdapterError(f"{name}: S2FT format_version {cfg.format_version!r} is not supported (this server reads version {FORMAT_VERSION})")
    return cfg


def parse_s2ft_files(
    files: dict[str, bytes], name: str, dims: Callable[[str], tuple[int, int]], num_layers: int
) -> dict[tuple[int, str], S2FTModuleDelta]:
    """Validate an S2FT adapter's two files against the base model and return its deltas.

    ``dims(module)`` gives the base model's ``(d_in, d_out)`` for a module name; ``num_layers`` its decoder
    layer count. Every defect raises `AdapterError` with a message that names the adapter and the tensor."""
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in files]
        raise AdapterError(f"{name}: an S2FT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE} ({', '.join(missing)} missing)")
    cfg = parse_s2ft_config(files[CONFIG_FILE], name)
    tensors = load_tensors(files[WEIGHTS_FILE], name)

    parts: dict[tuple[int, str], dict[tuple[str, str], torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(
                f"{name}: unexpected tensor {brief(key)} (expected model.layers.N.{{self_attn|mlp}}.MODULE."
                "s2_{row|col}_{indices|delta})"
            )
        layer, parent, module, kind, part = int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
        if module not in S2FT_MODULES:
            raise AdapterError(f"{name}: {key}: module {module!r} is not supported (supported: {', '.join(S2FT_MODULES)})")
        if parent != module_parent(module):
            raise AdapterError(f"{name}: {key}: {module} belongs under {module_parent(module)}, not {parent}")
        if layer >= num_layers:
            raise AdapterError(f"{name}: {key} addresses layer {layer} but the base model has {num_layers} layers")
        parts.setdefault((layer, module), {})[(kind, part)] = tensor
    if not parts:
        raise AdapterError(f"{name}: {WEIGHTS_FILE} holds no S2FT deltas")

    out: dict[tuple[int, str], S2FTModuleDelta] = {}
    for (layer, module), got in sorted(parts.items()):
        what = f"{name}: layer {layer} {module}"
        kinds = {kind for kind, _ in got}
        if len(kinds) > 1:
            raise AdapterError(f"{what} has both a row and a column delta; a module holds exactly one")
        (kind,) = kinds
        for part, other in (("indices", "delta"), ("delta", "indices")):
            if (kind, part) in got and (kind, other) not in got:
                raise AdapterError(f"{what} has s2_{kind}_{part} but not its pair s2_{kind}_{other}")
        idx, delta = got[(kind, "indices")], got[(kind, "delta")]
        d_in, d_out = dims(module)
        limit = d_out if kind == "row" else d_in
        if idx.dtype != torch.int32:
            raise AdapterError(f"{what}: s2_{kind}_indices must be int32, got {idx.dtype}")
        if idx.dim() != 1 or idx.numel() == 0:
            raise AdapterError(f"{what}: s2_{kind}_indices must be a non-empty 1-D tensor, got shape {tuple(idx.shape)}")
        k = idx.numel()
        if int(idx.min()) < 0 or int(idx.max()) >= limit:
            axis = "output rows" if kind == "row" else "input columns"
            raise AdapterError(f"{what}: s2_{kind}_indices out of range: the module has {limit} {axis} (got {int(idx.min())}..{int(idx.max())})")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise AdapterError(f"{what}: s2_{kind}_indices must be sorted and unique")
        if not delta.is_floating_point():
            raise AdapterError(f"{what}: s2_{kind}_delta must be floating point, got {delta.dtype}")
        want = (k, d_in) if kind == "row" else (d_out, k)
        if tuple(delta.shape) != want:
            raise AdapterError(
                f"{what}: s2_{kind}_delta has shape {tuple(delta.shape)}; with k={k} indices the base model "
                f"(d_out={d_out}, d_in={d_in}) needs {want}"
            )
        out[(layer, module)] = S2FTModuleDelta(kind=kind, indices=idx.to(torch.int64), delta=delta)

    declared, present = sorted(set(cfg.target_modules)), sorted({module for _, module in out})
    if declared != present:
        raise AdapterError(f"{name}: target_modules {brief(cfg.target_modules)} does not match the modules with deltas {present}")
    return out


def load_s2ft_adapter(path, name: str, dims: Callable[[str], tuple[int, int]], num_layers: int) -> dict[tuple[int, str], S2FTModuleDelta]:
    path = Path(path)
    files = {}
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / fname).is_file():
            raise AdapterError(f"{name}: {path} has no {fname}")
        files[fname] = (path / fname).read_bytes()
    return parse_s2ft_files(files, name, dims, num_layers)


def dense_delta(d: S2FTModuleDelta, d_out: int, d_in: int) -> torch.Tensor:
    """ΔW [d_out, d_in] in the delta's dtype: zero outside the stored rows / columns."""
    out = torch.zeros(d_out, d_in, dtype=d.delta.dtype, device=d.delta.device)
    idx = d.indices.to(device=d.delta.device, dtype=torch.int64)
    if d.kind == "row":
        out.index_copy_(0, idx, d.delta)
    else:
        out.index_copy_(1, idx, d.delta)
    return out


def apply_s2ft_delta(weight: torch.Tensor, d: S2FTModuleDelta) -> torch.Tensor:
    """The merged weight: ``weight`` with the delta added to its stored rows / columns, computed in the delta's
    dtype (or the weight's, if wider) and rounded once to the weight's dtype. Only the touched rows / columns
    are computed; the rest is copied. This is the rule under which the converter's adapters are bit-exact."""
    wide = torch.promote_types(weight.dtype, d.delta.dtype)
    out = weight.clone()
    idx = d.indices.to(device=weight.device, dtype=torch.int64)
    delta = d.delta.to(weight.device)
    if d.kind == "row":
        out[idx] = (weight[idx].to(wide) + delta.to(wide)).to(weight.dtype)
    else:
        out[:, idx] = (weight[:, idx].to(wide) + delta.to(wide)).to(weight.dtype)
    return out
