"""S²FT adapters on the engine side: the parsed deltas, how they sit in the S²FT pools, and the family.

The S²FT pool space keeps, per module, entries of selected columns (`s2_col_idx (M,)`, `s2_col_w
(M, d_out)`: y += x[:, c] Dᵀ) and of selected rows (`s2_row_idx (M,)`, `s2_row_w (M, d_in)`:
y[:, c] += x Rᵀ), applied by `kernels.s2ft_col` / `kernels.s2ft_row`. The file format is
`s2ft_format`; `s2ft_convert` makes adapters from fine-tuned checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.families.base import Family
from server.families.s2ft_format import PEFT_TYPE, S2FTModuleDelta, parse_s2ft_files
from server.lora.peft import cast_weight
from server.models.modules import module_dims
from server.models.config import ModelConfig


@dataclass(slots=True)
class S2FTWeights:
    name: str
    modules: dict[tuple[int, str], S2FTModuleDelta] = field(default_factory=dict)
    # (dtype, (layer, module) -> pool -> rows): its pool rows laid out in pinned host memory, kept by the
    # adapter manager on CUDA so the next load is one copy (server.lora.manager)
    host_rows: tuple | None = field(default=None, repr=False, compare=False)
    family = "s2ft"
    space = "s2ft"

    @property
    def units(self) -> int:
        """Entries it owns in every S²FT pool: its largest selection."""
        return max(d.indices.numel() for d in self.modules.values())

    @property
    def plan_units(self) -> int:
        return self.units

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(module for _, module in self.modules)

    def module_units(self) -> dict[str, int]:
        """module -> its largest selection over layers."""
        out: dict[str, int] = {}
        for (_, module), d in self.modules.items():
            out[module] = max(out.get(module, 0), d.indices.numel())
        return out

    @property
    def num_bytes(self) -> int:
        return sum(d.delta.nbytes + d.indices.numel() * 4 for d in self.modules.values())

    def write_into(self, pools: dict[str, torch.Tensor], layer: int, module: str, start: int, dtype: torch.dtype) -> None:
        d = self.modules[(layer, module)]
        k = d.indices.numel()
        if d.kind == "col":  # y += x[:, c] Dᵀ: entry j holds column c_j of D
            pools["s2_col_idx"][start : start + k] = d.indices
            pools["s2_col_w"][start : start + k] = d.delta.T.to(dtype)
        else:  # y[:, c] += x Rᵀ: entry j holds row j of R
            pools["s2_row_idx"][start : start + k] = d.indices
            pools["s2_row_w"][start : start + k] = d.delta.to(dtype)


class S2FTSpace:
    name = "s2ft"

    def pools(self, d_in: int, d_out: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"s2_col_idx": ((), torch.long), "s2_col_w": ((d_out,), dtype), "s2_row_idx": ((), torch.long), "s2_row_w": ((d_in,), dtype)}

    def has_pools(self, pools: dict[str, torch.Tensor]) -> bool:
        return "s2_col_w" in pools

    def apply(self, out: torch.Tensor, x: torch.Tensor, slot, plan, linear) -> None:
        p, k = slot.pools, linear.kernels
        k.s2ft_col(out, x, p["s2_col_idx"], p["s2_col_w"], plan)
        k.s2ft_row(out, x, p["s2_row_idx"], p["s2_row_w"], plan)


def parse_s2ft(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype) -> S2FTWeights:
    deltas = parse_s2ft_files(files, name, lambda module: module_dims(model_cfg, module), model_cfg.num_layers)
    return S2FTWeights(name, {
        (layer, module): S2FTModuleDelta(d.kind, d.indices, cast_weight(d.delta, dtype, f"{name}: layer {layer} {module} s2_{d.kind}_delta"))
        for (layer, module), d in deltas.items()
    })


SPACE = S2FTSpace()
FAMILY = Family("s2ft", lambda tag: tag.names("s2ft", PEFT_TYPE), lambda files, name, ctx: parse_s2ft(files, name, ctx.model_cfg, ctx.dtype))
