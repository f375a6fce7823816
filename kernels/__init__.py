"""Compute kernels for hotswap. Imports only torch."""

from kernels.lora import LoraPlan, make_lora_plan, sgmv_lora, sgmv_lora_reference

__all__ = ["LoraPlan", "make_lora_plan", "sgmv_lora", "sgmv_lora_reference"]
