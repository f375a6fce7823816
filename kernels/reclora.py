"""RecLoRA bank formulation: per-token user mixing without materialising per-user weights."""
from __future__ import annotations

import torch
from torch import Tensor


def reclora_bank_reference(y: Tensor, x: Tensor, a_bank: Tensor, b_bank: Tensor, w: Tensor, scale: float) -> None:
    """Semantics: y[t] += s · x[t] (Σ_k w[t,k] A_k)ᵀ (Σ_k w[t,k] B_k)ᵀ

    x: [T, d_in], y: [T, d_out] (in place), a_bank: [K, r, d_in], b_bank: [K, d_out, r], w: [T, K] per-token
    user weights. Readable loop over tokens, float32.
    """
    for t in range(x.shape[0]):
        a_u = torch.einsum("k,kri->ri", w[t].float(), a_bank.float())
        b_u = torch.einsum("k,kor->or", w[t].float(), b_bank.float())
        y[t] += (scale * (x[t].float() @ a_u.T) @ b_u.T).to(y.dtype)


def reclora_bank(y: Tensor, x: Tensor, a_bank: Tensor, b_bank: Tensor, w: Tensor, scale: float) -> None:
    """Semantics: y[t] += s · x[t] (Σ_k w[t,k] A_k)ᵀ (Σ_k w[t,k] B_k)ᵀ   (same as the reference)

    H = x A_bankᵀ [T, K, r]; h = Σ_k w[:, k] H[:, k] [T, r]; G = w ⊗ h [T, K·r]; y += s · G B_bankᵀ.
    Two GEMMs over the whole bank plus elementwise mixing: no per-user weights, no per-token loop.
    """
    k, r, d_in = a_bank.shape
    h_all = (x @ a_bank.reshape(k * r, d_in).T).view(-1, k, r)  # (T, K, r)
    h = torch.einsum("tk,tkr->tr", w.to(h_all.dtype), h_all)  # (T, r)
    g = (w.to(h.dtype).unsqueeze(2) * h.unsqueeze(1)).reshape(-1, k * r)  # (T, K·r)
    b_flat = b_bank.permute(1, 0, 2).reshape(b_bank.shape[1], k * r)  # (d_out, K·r)
    y.add_(g @ b_flat.T, alpha=scale)
