"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

q/k/v and gate/up are fused into one GEMM each; adapters attach per logical module
(`q_proj`, `k_proj`, ... names as in Hugging Face checkpoints and PEFT configs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import TORCH_KERNELS
from kernels.quant import Int8Weight, int8_linear
from server.layers.attention import PagedAttention
from server.layers.context import ForwardContext
from server.layers.linear import AdaptedLinear
from server.layers.rotary import RotaryEmbedding
from server.models.config import ModelConfig



class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 like the reference implementation, then back
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        hd, h, hkv, d = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, hd
        self.q_size, self.kv_size = h * hd, hkv * hd
        self.rotary = rotary
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.qkv_proj = AdaptedLinear(d, {"q_proj": h * hd, "k_proj": hkv * hd, "v_proj": hkv * hd}, cfg.attention_bias, dtype)
        self.attn = PagedAttention(h, hkv, hd)
        self.o_proj = AdaptedLinear(h * hd, {"o_proj": d}, False, dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        i = cfg.intermediate_size
        self.gate_up_proj = AdaptedLinear(d, {"gate_proj": i, "up_proj": i}, cfg.mlp_bias, dtype)
        self.down_proj = AdaptedLinear(i, {"down_proj": d}, cfg.mlp_bias, dtype)
        self.intermediate_size = i

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(x), ctx)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        x = x + self.o_proj(self.attn(q, k, v, ctx), ctx)
        h = self.post_attention_layernorm(x)
        gate_up = self.gate_up_proj(h, ctx)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        act = F.silu(gate) * up
        for hook in ctx.hooks:  # adapters with per-step work of their own (server.families.base.StepHook)
            hook.before_down(self, h, gate_up, act)
        out = self.down_proj(act, ctx)
        for hook in ctx.hooks:
            hook.after_mlp(self, h, gate_up, out)
        return x + out

    def linears(self) -> tuple[AdaptedLinear, ...]:
        return (self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj)

    def adapter_targets(self) -> dict[str, AdaptedLinear]:
        """Logical module name -> the (possibly fused) linear that holds it."""
        return {name: lin for lin in self.linears() for name in lin.slots}


class LlamaForCausalLM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.config, self.dtype = cfg, dtype
        self.embed_tokens = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, rotary, dtype, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype), requires_grad=False)
        # Set by server.models.quantize: int8 per-row tables (tied models share one).
        self.embed_quant: Int8Weight | None = None
        self.lm_head_quant: Int8Weight | None = None
        self.kernels = TORCH_KERNELS  # set by use_kernels

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """A logical module's base weight (d_out, d_in) in float32, dequantized if the base is quantized."""
        lin = self.layers[layer].adapter_targets()[module]
        slot = lin.slots[module]
        weight = lin.weight if lin.quant is None else lin.quant.dequantize()
        return weight[slot.out_start : slot.out_end].float()

    def use_kernels(self, kernels) -> None:
        """Route every adapter delta and the attention through `kernels` (a kernels.dispatch.KernelSet)."""
        self.kernels = kernels
        for layer in self.layers:
            layer.attn.kernels = kernels
            for lin in layer.linears():
                lin.kernels = kernels

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (T,) -> their embeddings (T, d)."""
        return self.embed_tokens(input_ids) if self.embed_quant is None else self.embed_quant.rows(input_ids, self.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: (T,) -> hidden states (T, d)."""
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_quant is not None:
            return int8_linear(hidden, self.lm_head_quant).float()
        return F.linear(hidden, self.lm_head_weight).float()
