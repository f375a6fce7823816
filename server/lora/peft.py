"""Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

Only safetensors is read: pickled `adapter_model.bin` files are refused, never unpickled.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import re2
import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load

from server.lora.config_schema import LoraConfig, brief, explain
from server.errors import InvalidAdapter
from server.models.config import ModelConfig
from server.models.modules import ADAPTER_MODULES, module_dims, module_path  # module_dims: re-exported for older importers

# [0-9]{1,9}, not \d+: int() of a Unicode digit or of thousands of digits must never be reached
_KEY = re.compile(r"(?:^|\.)layers\.([0-9]{1,9})\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# DoRA (use_dora): one magnitude per output channel of each adapted module
_MAGNITUDE = re.compile(r"(?:^|\.)layers\.([0-9]{1,9})\.(?:self_attn|mlp)\.(\w+)\.lora_magnitude_vector(?:\.[\w-]+)?(?:\.weight)?$")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Schema = TypeVar("Schema", bound=BaseModel)


# The adapter's files are malformed or do not fit the base model (a domain error: the API answers 400).
AdapterError = InvalidAdapter


@dataclass(slots=True)
class LoraWeights:
    name: str
    rank: int  # the largest rank over its modules: rows it takes in the pools
    # (layer, module) -> (A (r, d_in), B (d_out, r), scale)
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    # DoRA only (read with dora=True): (layer, module) -> magnitude m (d_out,), float32
    magnitudes: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # (dtype, (layer, module) -> pool -> rows): its pool rows laid out in pinned host memory, kept by the
    # adapter manager on CUDA so the next load is one copy (server.lora.manager)
    host_rows: tuple | None = field(default=None, repr=False, compare=False)

    family = "lora"
    space = "lora"  # rank-rows of the LoRA pools (server.families.lora)

    @property
    def units(self) -> int:
        return self.rank

    @property
    def plan_units(self) -> int:
        return self.rank

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(module for _, module in self.modules)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values())

    def module_units(self) -> dict[str, int]:
        """module -> its largest rank over layers."""
        out: dict[str, int] = {}
        for (_, module), (a, _, _) in self.modules.items():
            out[module] = max(out.get(module, 0), a.shape[0])
        return out

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        """Place this module's A rows and scaled Bᵀ rows at [start, start + r) of the LoRA pools."""
        a, b, scale = self.modules[(layer, module)]
        r = a.shape[0]
        pools["lora_a"][start : start + r] = a
        pools["lora_b"][start : start + r] = (b.float().T * scale).to(dtype)


# RE2 matches in linear time whatever the pattern. 64 KiB of program and DFA cache per pattern is
# plenty for a module-name regex and bounds what one costs to compile (about a millisecond at most).
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 64 << 10
_RE2_OPTIONS.log_errors = False


def compile_patterns(patterns: dict | None, name: str, field_name: str) -> list[tuple[str, object, object]]:
    r"""(pattern, compiled, value) for a rank_pattern / alpha_pattern map, each compiled once, in order.

    PEFT (peft.utils.other.get_pattern_key) matches `re.match(rf"(.*\.)?({pattern})$", key)`: the
    pattern matches the module key or a dotted suffix of it. The same regex runs under RE2."""
    out = []
    for pattern, value in (patterns or {}).items():
        try:
            regex = re2.compile(rf"(.*\.)?({pattern})$", _RE2_OPTIONS)
        except re2.error as e:
            reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
            raise AdapterError(
                f"{name}: {field_name} key {brief(pattern)} must be an RE2 regex (hotswap matches module names "
                f"in linear time: no backreferences or lookaround): {reason[:200]}"
            ) from None
        out.append((pattern, regex, value))
    return out


def _pattern_value(patterns: list[tuple[str, object, object]], key: str, default):
    """The value of the first pattern matching the module key (PEFT's lookup), else the default."""
    for pattern, regex, value in patterns:
        if key == pattern or regex.match(key):
            return value
    return default


CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def parse_adapter_config(raw: bytes, name: str, schema: type[Schema], max_rank: int | None = None) -> Schema:
    """adapter_config.json checked against a family's schema (server.lora.config_schema); ranks above
    `max_rank` are refused when it is given."""
    try:
        cfg = json.loads(raw)
    except RecursionError:
        raise AdapterError(f"{name}: {CONFIG_FILE} is nested too deeply to be an adapter config") from None
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of thousands of digits
        raise AdapterError(f"{name}: {CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{name}: {CONFIG_FILE} must hold a JSON object")
    try:
        return schema.model_validate(cfg, context={"max_rank": max_rank})
    except ValidationError as e:
        raise AdapterError(f"{name}: {CONFIG_FILE}: {explain(e, schema, cfg)}") from None


def load_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors. Every family loads its weights through here, so
    none ever serves a NaN or an infinity: floating point tensors must be finite, and of a dtype the
    kernels take (no float8, complex or bool)."""
    try:
        tensors = safetensors_load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    for key, t in tensors.items():
        if (t.is_floating_point() and t.dtype not in _FLOAT_DTYPES) or t.is_complex() or t.dtype == torch.bool:
            raise AdapterError(f"{name}: tensor {brief(key)} is {t.dtype}: adapter weights must be float16, bfloat16, float32 or float64 (S²FT indices int32)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{name}: tensor {brief(key)} holds NaN or infinite values (non-finite weights): fix the adapter and upload it again")
    return tensors


def peak_abs(t: torch.Tensor) -> float:
    """max |t| (0 for an empty tensor), without an |t| copy of a large tensor."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    return float(max(-lo, hi))


def cast_weight(t: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> torch.Tensor:
    """`t` in the serving dtype. Refused if it, or it times the scale the pools apply (in float32, as
    `write_into` computes it), overflows that dtype: a float64 1e300 is finite but an infinity in float32."""
    peak = peak_abs(t)
    # a scale beyond float32 makes even zeros NaN there (0 * inf), so it is refused whatever the peak
    if not math.isfinite(torch.tensor(peak, dtype=torch.float32).mul(max(1.0, abs(scale))).to(dtype).item()):
        scaled = f" times the scale {scale:.3g}" if scale != 1 else ""
        raise AdapterError(f"{what}: values up to {peak:.3g}{scaled} overflow {dtype}: rescale the weights" + (" or lora_alpha" if scaled else ""))
    return t.to(dtype)


def read_adapter_files(path: Path, name: str) -> dict[str, bytes]:
    """The two PEFT files of a directory, as bytes."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{name}: {path} has no {CONFIG_FILE}")
    if not (path / WEIGHTS_FILE).is_file():
        hint = " (pickled adapter_model.bin is never loaded: convert it to safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{name}: {WEIGHTS_FILE} is missing{hint}")
    return {CONFIG_FILE: (path / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: (path / WEIGHTS_FILE).read_bytes()}


def load_peft_lora(path: Path, name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int) -> LoraWeights:
    return parse_peft_lora(read_adapter_files(path, name), name, model_cfg, dtype, max_rank)


def parse_peft_lora(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype, max_rank: int, *, dora: bool = False) -> LoraWeights:
    """Validate PEFT LoRA files against the base model and return its weights (A, B, scale per module).
    With `dora`, the files must be a DoRA adapter (use_dora) and its magnitude vectors are read too;
    without, a DoRA adapter is refused (its math is not plain LoRA's)."""
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise AdapterError(f"{name}: a LoRA adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = parse_adapter_config(files[CONFIG_FILE], name, LoraConfig, max_rank)
    if cfg.peft_type != "LORA":
        raise AdapterError(f"{name}: peft_type {cfg.peft_type!r} is not a LoRA adapter")
    if bool(cfg.use_dora) != dora:
        raise AdapterError(f"{name}: a DoRA adapter (use_dora) is not a plain LoRA" if cfg.use_dora else f"{name}: not a DoRA adapter (use_dora is not set)")
    if cfg.bias != "none":
        raise AdapterError(f"{name}: adapters that train biases (bias={cfg.bias!r}) are not supported")
    if cfg.modules_to_save:
        raise AdapterError(f"{name}: modules_to_save {brief(cfg.modules_to_save)} is not supported: only LoRA deltas are served")
    rank_pattern = compile_patterns(cfg.rank_pattern, name, "rank_pattern")
    alpha_pattern = compile_patterns(cfg.alpha_pattern, name, "alpha_pattern")
    tensors = load_tensors(files[WEIGHTS_FILE], name)

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    magnitudes: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in tensors.items():
        if dora and (m := _MAGNITUDE.search(key)):
            slot = (int(m.group(1)), m.group(2))
            if slot in magnitudes:
                raise AdapterError(f"{name}: two tensors hold the magnitude of layer {slot[0]} {slot[1]} (the second is {brief(key)})")
            magnitudes[slot] = tensor
            continue
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"{name}: unexpected tensor {brief(key)} (only LoRA A/B weights of decoder layers are served)")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in ADAPTER_MODULES:
            raise AdapterError(f"{name}: target module {brief(module)} is not supported (supported: {', '.join(ADAPTER_MODULES)})")
        if layer >= model_cfg.num_layers:
            raise AdapterError(f"{name}: {brief(key)} addresses layer {layer} but the base model has {model_cfg.num_layers}")
        pair = pairs.setdefault((layer, module), {})
        if which in pair:  # e.g. "layers.1" and "layers.01", or two prefixes: which one would be served?
            raise AdapterError(f"{name}: two tensors hold layer {layer} {module} lora_{which} (the second is {brief(key)})")
        pair[which] = tensor
    if not pairs:
        raise AdapterError(f"{name}: adapter_model.safetensors holds no LoRA weights")

    out = LoraWeights(name=name, rank=0)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{name}: layer {layer} {module} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        d_in, d_out = module_dims(model_cfg, module)
        if not (a.is_floating_point() and b.is_floating_point()):
            raise AdapterError(f"{name}: layer {layer} {module} weights must be floating point, got {a.dtype} and {b.dtype}")
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, r) or r == 0:
            raise AdapterError(
                f"{name}: layer {layer} {module} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                f"the base model needs A (r, {d_in}) and B ({d_out}, r) with r >= 1"
            )
        if r > max_rank:
            raise AdapterError(f"{name}: rank {r} exceeds --max-lora-rank {max_rank}")
        module_key = module_path(layer, module)
        declared_r = _pattern_value(rank_pattern, module_key, cfg.r)
        if declared_r != r:
            raise AdapterError(f"{name}: layer {layer} {module} has rank {r} but the config declares {declared_r}")
        alpha = _pattern_value(alpha_pattern, module_key, cfg.lora_alpha)
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        what = f"{name}: layer {layer} {module}"
        out.modules[(layer, module)] = (cast_weight(a, dtype, f"{what} lora_A"), cast_weight(b, dtype, f"{what} lora_B", scale), float(scale))
        out.rank = max(out.rank, r)
        if dora:
            mag = magnitudes.pop((layer, module), None)
            if mag is None or not mag.is_floating_point() or tuple(mag.shape) != (d_out,):
                got = "none" if mag is None else f"{mag.dtype} {tuple(mag.shape)}"
                raise AdapterError(f"{what}: a DoRA module needs a floating point lora_magnitude_vector ({d_out},), got {got}")
            out.magnitudes[(layer, module)] = cast_weight(mag, torch.float32, f"{what} lora_magnitude_vector")
    if magnitudes:
        layer, module = next(iter(magnitudes))
        raise AdapterError(f"{name}: layer {layer} {module} has a lora_magnitude_vector but no lora_A/lora_B")
    return out
