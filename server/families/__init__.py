"""Adapter families: one module each (LoRA, S²FT, routed experts, RecLoRA, ...), found by `registry`.

A family module defines `FAMILY` (a `base.Family`) and, if it brings its own kind of device pools,
`SPACE` (a `base.PoolSpace`). Helpers that are not families live here too: file formats and
converters (`s2ft_format`, `s2ft_convert`), the SG-LoRA generators (`sglora`, `text_encoder`).
"""
