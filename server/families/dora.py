"""DoRA in PEFT format (`use_dora: true`): LoRA whose result is rescaled per output channel.

For a linear y = x Wᵀ + b with LoRA (A, B, scale s) and magnitude m (d_out,), PEFT computes at
inference (peft/tuners/lora/dora.py, DoraLinearLayer.forward; the norm is detached, the bias is left
out of the rescale):

    y = b + f ⊙ (x Wᵀ + s · x Aᵀ Bᵀ),   f = m / ‖W + s B A‖_row   (norm over d_in, per output channel)

f depends on the weights alone, so it is computed once here, when the adapter is parsed, against the
base weights the engine serves (dequantized if the base is quantized: `ParseContext.base_weight`).

The files are PEFT's (`server.lora.peft.parse_peft_lora(..., dora=True)` reads them: lora_A/lora_B
plus `lora_magnitude_vector` per module). The DoRA pool space keeps, per module, `dora_a (N, d_in)`
and `dora_b (N, d_out)` rows as the LoRA space does (an adapter of rank r owns units [start, start +
r), Bᵀ with the scale folded in), and `dora_g (N, d_out)` float32 with g = f − 1 at the adapter's
first unit (zero elsewhere, and zero, the identity, in layers the adapter does not adapt). Applying
it is the segmented LoRA op on the DoRA segments, then `kernels.dora.dora_rescale` on their rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.dora import dora_rescale
from server.families.base import Family, ParseContext
from server.lora.config_schema import FamilyTag
from server.lora.peft import AdapterError, parse_peft_lora


@dataclass(slots=True)
class DoraWeights:
    name: str
    rank: int  # the largest rank over its modules: units it takes in the DoRA pools
    # (layer, module) -> (A (r, d_in), B (d_out, r), scale), in the serving dtype
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    # (layer, module) -> f = m / ‖W + s B A‖_row (d_out,), float32
    factors: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # (dtype, (layer, module) -> pool -> rows): its pool rows laid out in pinned host memory, kept by the
    # adapter manager on CUDA so the next load is one copy (server.lora.manager)
    host_rows: tuple | None = field(default=None, repr=False, compare=False)

    family = "dora"
    space = "dora"

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
        return sum(a.nbytes + b.nbytes for a, b, _ in self.modules.values()) + sum(f.nbytes for f in self.factors.values())

    def module_units(self) -> dict[str, int]:
        """module -> its largest rank over layers."""
        out: dict[str, int] = {}
        for (_, module), (a, _, _) in self.modules.items():
            out[module] = max(out.get(module, 0), a.shape[0])
        return out

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        """A rows and scaled Bᵀ rows at [start, start + r), g = f − 1 at row `start`."""
        a, b, scale = self.modules[(layer, module)]
        r = a.shape[0]
        pools["dora_a"][start : start + r] = a
        pools["dora_b"][start : start + r] = (b.float().T * scale).to(dtype)
        pools["dora_g"][start] = self.factors[(layer, module)] - 1


class DoraSpace:
    name = "dora"

    def pools(self, d_in: int, d_out: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"dora_a": ((d_in,), dtype), "dora_b": ((d_out,), dtype), "dora_g": ((d_out,), torch.float32)}

    def has_pools(self, pools: dict[str, torch.Tensor]) -> bool:
        return "dora_a" in pools

    def apply(self, out: torch.Tensor, x: torch.Tensor, slot, plan, linear) -> None:
        p = slot.pools
        linear.kernels.sgmv_lora(out, x, p["dora_a"], p["dora_b"], plan)  # out = x Wᵀ + b + s x Aᵀ Bᵀ
        bias = None if linear.bias is None else linear.bias[slot.out_start : slot.out_end]
        dora_rescale(out, bias, p["dora_g"], plan)  # out = b + f ⊙ (out − b)


def _claims(tag: FamilyTag) -> bool:
    if tag.hotswap_family is not None:
        return tag.hotswap_family == "dora"
    return tag.peft_type == "LORA" and bool(tag.use_dora)


def dora_factors(name: str, modules, magnitudes, base_weight) -> dict[tuple[int, str], torch.Tensor]:
    """f = m / ‖W + s B A‖_row per module, in float32 (AdapterError where a norm is 0 or f is not finite)."""
    factors = {}
    for (layer, module), (a, b, scale) in modules.items():
        w = base_weight(layer, module).float()
        norm = torch.linalg.vector_norm(torch.addmm(w, b.float(), a.float(), alpha=scale), dim=1)  # (d_out,)
        f = magnitudes[(layer, module)].float() / norm
        what = f"{name}: layer {layer} {module}"
        if not bool((norm > 0).all()):
            c = int((norm > 0).logical_not().nonzero()[0])
            raise AdapterError(f"{what}: output channel {c} of W + sBA is all zeros: DoRA's factor m / ‖W + sBA‖ is undefined there")
        if not bool(torch.isfinite(f).all()):
            c = int(torch.isfinite(f).logical_not().nonzero()[0])
            m = float(magnitudes[(layer, module)][c])
            raise AdapterError(f"{what}: DoRA's factor m / ‖W + sBA‖ overflows float32 at output channel {c} (m = {m:.3g}, norm = {float(norm[c]):.3g})")
        factors[(layer, module)] = f
    return factors


def _parse(files: dict[str, bytes], name: str, ctx: ParseContext) -> DoraWeights:
    lora = parse_peft_lora(files, name, ctx.model_cfg, ctx.dtype, ctx.max_rank, dora=True)
    if ctx.base_weight is None:
        raise AdapterError(f"{name}: a DoRA adapter's factors need the base model's weights: parse it with the engine (LLMEngine.parse_adapter)")
    return DoraWeights(name, lora.rank, lora.modules, dora_factors(name, lora.modules, lora.magnitudes, ctx.base_weight))


SPACE = DoraSpace()
FAMILY = Family("dora", _claims, _parse)
