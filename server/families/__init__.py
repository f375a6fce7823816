"""Adapter families beyond PEFT LoRA: their file formats and converters (S²FT: `s2ft_format`, `s2ft_convert`)."""
