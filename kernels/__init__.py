"""Compute kernels for hotswap. Imports only torch."""

from kernels.lora import LoraPlan, make_bgmv_plan, make_lora_plan, sgmv_lora, sgmv_lora_reference
from kernels.reclora import reclora_bank, reclora_bank_reference
from kernels.s2ft import s2ft_col, s2ft_col_reference, s2ft_dense_delta, s2ft_row, s2ft_row_reference

__all__ = [
    "LoraPlan", "make_bgmv_plan", "make_lora_plan", "sgmv_lora", "sgmv_lora_reference",
    "reclora_bank", "reclora_bank_reference",
    "s2ft_col", "s2ft_col_reference", "s2ft_row", "s2ft_row_reference", "s2ft_dense_delta",
]
