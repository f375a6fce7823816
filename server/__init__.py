"""hotswap: a multi-adapter (LoRA hot-swapping) LLM inference server.

Kept import-light on purpose: importing ``server`` must not pull in torch.
"""

__version__ = "0.1.0"
