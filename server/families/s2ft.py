"""S²FT adapters on the engine side: the parsed deltas and how they sit in the S²FT pools."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from server.families.s2ft_format import S2FTModuleDelta, parse_s2ft_files
from server.lora.peft import cast_weight, module_dims
from server.models.config import ModelConfig


@dataclass(slots=True)
class S2FTWeights:
    name: str
    modules: dict[tuple[int, str], S2FTModuleDelta] = field(default_factory=dict)
    family = "s2ft"

    @property
    def units(self) -> int:
        """Entries it owns in every S²FT pool: its largest selection."""
        return max(d.indices.numel() for d in self.modules.values())

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


def parse_s2ft(files: dict[str, bytes], name: str, model_cfg: ModelConfig, dtype: torch.dtype) -> S2FTWeights:
    deltas = parse_s2ft_files(files, name, lambda module: module_dims(model_cfg, module), model_cfg.num_layers)
    return S2FTWeights(name, {
        (layer, module): S2FTModuleDelta(d.kind, d.indices, cast_weight(d.delta, dtype, f"{name}: layer {layer} {module} s2_{d.kind}_delta"))
        for (layer, module), d in deltas.items()
    })
