"""SG-LoRA's own generator: a conditional VAE over the experts' LoRA parameters, conditioned on the
description embedding (`"generator": "cvae"`, next to the exact `fusion` of `sglora.py`).

What the paper does (Li, Chen, Rao, Jiang, Wei, Guo, "SG-LoRA: Semantic-guided LoRA Parameters
Generation", arXiv 2509.10535, 2025; CVPR 2026; code github.com/keepgoingjkg/SG-LoRA). From its
abstract and the public summaries of it (arxiv.org/abs/2509.10535, en.papernotes.org CVPR2026
notes, emergentmind.com "semantic-guided-lora-sg-lora"): task descriptions are the semantic bridge;
a new task's description is embedded in a text-embedding space shared with the descriptions of
known expert tasks (each with its LoRA); its proximity to the experts guides generation; a
conditional VAE, trained on the experts' LoRA parameters and conditioned on the semantic
embedding, models the target task's LoRA parameter distribution, and new LoRA parameters are
sampled from it for an unseen description — zero-shot, no task data, no fine-tuning; the
summaries describe it as a CVAE that fuses the experts' knowledge through the semantic embeddings,
evaluated on image-text retrieval and classification. The sources available here give no more
architectural detail than that (layer sizes, the exact condition vector, the loss weights and how
many parameter samples per expert were not available), so everything below that is not in this
paragraph is our choice, made for LLM LoRAs served by hotswap.

What is implemented here, and where it simplifies
    Condition. The 384-d all-MiniLM-L6-v2 embedding e of the description (text_encoder.py), rounded
    to 1e-6 as the selection's similarities are. It enters the CVAE as its coordinates in the span of
    the experts' embeddings: c = W (e - ē) / s_c (W: the principal directions of the N expert
    embeddings, at most N-1 of them; s_c one global scale, no whitening). Nothing outside that span
    can be learned from N examples, and 384 inputs for tens of examples would only give the
    networks room to overfit. The paper builds its condition by a similarity-weighted aggregation
    of the experts' task semantics (papernotes' summary); expressing e in the coordinates of the
    experts' embeddings is our version of that bridge (the paper's exact formula was not available).

    Reduced parameters. A rank-16 q/v LoRA of SmolLM2-135M is ~0.9 M numbers and there are tens of
    experts, and raw (A, B) are not identifiable: (A, B) -> (R A, B R⁻¹) leaves ΔW = s·B·A unchanged,
    so two experts' A's cannot be compared entry by entry. We therefore model ΔW itself, in a
    gauge-invariant shared basis:
      1. Per module, shared bases P (d_out × p) and Q (d_in × p): the top-p eigenvectors of
         Σ_i ΔW_i ΔW_iᵀ and Σ_i ΔW_iᵀ ΔW_i (computed from the factors: QR of A and B, then an eigh of
         a small Gram matrix; never a dense ΔW), with a fixed sign convention. Each expert becomes
         a p×p core C_i = Pᵀ ΔW_i Q (which depends on ΔW only). The fit reports the share of the
         experts' Σ‖ΔW‖² the bases keep (`energy_captured`); p is `basis_rank` (default 32, at most 64).
      2. PCA over the experts' concatenated cores: x_i = Vᵀ (y_i - ȳ) / s_x, at most N-1 components,
         computed from the N×N Gram matrix (exact: no component is dropped but null ones).
    The CVAE then models x (≤ N-1 numbers) instead of ~10⁶ parameters.

    CVAE (Sohn et al. 2015 form, standard normal prior). Encoder q(z | x, c) and decoder p(x | z, c)
    are two-hidden-layer GELU MLPs (width 128, latent 8); the decoder has an extra linear path c -> x
    (a ridge-like regression the MLP corrects). Loss: ‖x̂ - x‖² + β·KL(q ‖ N(0, I)), β = 0.05 with a
    linear warm-up over the first 30 % of epochs; full-batch AdamW (lr 3e-3, weight decay 1e-3), in
    float64, deterministic for a given seed. Fitting 10-50 rank-16 q/v experts takes seconds (see
    docs/adapters.md).

    Sampling. x̂ = decoder(z, c(e)); ŷ = ȳ + s_x V x̂; per module Ĉ = its block of ŷ, ΔŴ = P Ĉ Qᵀ,
    truncated to the output rank r by the SVD of Ĉ (p×p, cheap): B = P U_r √S_r, A = √S_r V_rᵀ Qᵀ,
    written as a PEFT LoRA with lora_alpha = r (scale 1) by `sglora.peft_lora_files`. r defaults to
    the experts' largest rank (capped by p).

    Seed. seed 0 decodes z = 0, the prior's mode: the generator's single best guess for the
    description. seed s > 0 samples z ~ N(0, I) from torch.Generator().manual_seed(s): the paper's
    sampling, one adapter per seed. With one adapter per description the posterior tends to collapse
    (KL pushes z to carry little), so seeds vary the adapter only a little; that is what the data
    supports.

    Determinism. Fitting and generation run on one torch thread (`one_torch_thread`), in float64
    from float32/float64 stored tensors; the embedding is rounded, eigenvector and SVD signs are
    fixed, the files are written with sorted keys: the same artifact, description and seed give
    byte-identical files (same machine and library versions), and the same experts, options and
    seed give the same fitted tensors.

The artifact (`to_files`): `generator.json` (format, shapes, fit settings and report, the experts
it was fitted on) and `generator.safetensors` (bases, PCA, condition map, CVAE weights). It is stored
in the registry as a versioned, sha256-verified artifact (adapters_store.artifacts).
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from server.families.sglora import GenerationError, RankOverflow, peft_lora_files
from server.lora.peft import LoraWeights
from server.models.config import ModelConfig
from server.models.modules import ADAPTER_MODULES, module_dims

FORMAT = "sglora-cvae/1"
NAME = "cvae"
CONFIG_FILE, WEIGHTS_FILE = "generator.json", "generator.safetensors"
EMBEDDING_DECIMALS = 6

# bounds (the admin API validates against the same numbers)
MAX_EXPERTS = 64
MIN_EXPERTS = 2
MAX_EPOCHS = 20_000
MAX_BASIS_RANK = 64
MAX_LATENT_DIM = 32
MAX_HIDDEN = 256
MAX_ARTIFACT_BYTES = 192 << 20  # the fitted tensors (estimated before anything is computed)

_EIG_TOL = 1e-10  # eigenvalues below this times the largest are numerical zeros


class ArtifactError(ValueError):
    """The generator artifact's files are not a valid sglora-cvae generator (or not for this model)."""


@dataclass(frozen=True, slots=True)
class FitOptions:
    epochs: int = 2000
    seed: int = 0
    basis_rank: int = 32
    rank: int | None = None  # output LoRA rank; None: the experts' largest rank, capped by basis_rank
    latent_dim: int = 8
    hidden: int = 128
    beta: float = 0.05
    lr: float = 3e-3
    weight_decay: float = 1e-3

    def check(self) -> None:
        for name, value, lo, hi in (
            ("epochs", self.epochs, 1, MAX_EPOCHS), ("basis_rank", self.basis_rank, 1, MAX_BASIS_RANK),
            ("latent_dim", self.latent_dim, 1, MAX_LATENT_DIM), ("hidden", self.hidden, 4, MAX_HIDDEN),
        ):  # fmt: skip
            if not lo <= value <= hi:
                raise GenerationError(f"{name} must be in {lo}..{hi}, not {value}")
        if self.rank is not None and not 1 <= self.rank <= self.basis_rank:
            raise GenerationError(f"rank must be in 1..basis_rank ({self.basis_rank}), not {self.rank}")


@dataclass(slots=True)
class Expert:
    """One expert adapter as the fit sees it: its identity, its description and its LoRA."""

    ref: str  # tenant/name
    version: int
    sha256: str
    description: str
    lora: LoraWeights


# -- the network ------------------------------------------------------------------------------------
class CVAE(torch.nn.Module):
    """q(z | x, c) and p(x | z, c) as small MLPs; the decoder adds a linear path from c."""

    def __init__(self, x_dim: int, c_dim: int, z_dim: int, hidden: int):
        super().__init__()
        nn = torch.nn
        self.x_dim, self.c_dim, self.z_dim, self.hidden = x_dim, c_dim, z_dim, hidden
        self.encoder = nn.Sequential(nn.Linear(x_dim + c_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + c_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, x_dim))
        self.skip = nn.Linear(c_dim, x_dim)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(torch.cat([x, c], dim=-1)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, c], dim=-1)) + self.skip(c)


# -- fitting ----------------------------------------------------------------------------------------
def _sym_top(gram_side: torch.Tensor, p: int) -> torch.Tensor:
    """The top-p left singular vectors of G (d × m), float64, signs fixed (largest |entry| positive).
    Uses the eigh of the smaller Gram matrix; directions with a numerically zero singular value are dropped."""
    d, m = gram_side.shape
    if m <= d:
        evals, evecs = torch.linalg.eigh(gram_side.T @ gram_side)
        evals, evecs = evals.flip(0), evecs.flip(1)
        keep = int((evals > _EIG_TOL * max(float(evals[0]), 1e-300)).sum()) if m else 0
        keep = min(keep, p)
        if keep == 0:
            return gram_side.new_zeros(d, 0)
        u = gram_side @ evecs[:, :keep] / evals[:keep].sqrt()
        u, _ = torch.linalg.qr(u)  # re-orthonormalise (the division amplifies rounding in small directions)
    else:
        evals, evecs = torch.linalg.eigh(gram_side @ gram_side.T)
        evals, evecs = evals.flip(0), evecs.flip(1)
        keep = min(int((evals > _EIG_TOL * max(float(evals[0]), 1e-300)).sum()), p)
        u = evecs[:, :keep]
    return _fix_signs(u.contiguous())


def _fix_signs(u: torch.Tensor) -> torch.Tensor:
    """Flip columns so that each one's entry of largest magnitude is positive (a deterministic convention)."""
    if not u.numel():
        return u
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs


def _top_components(gram: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) of a PSD Gram matrix, largest first, numerical zeros dropped, at most `limit`."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    top = max(float(evals[0]), 0.0) if evals.numel() else 0.0
    keep = min(int((evals > _EIG_TOL * top).sum()) if top > 0 else 0, limit)
    return evals[:keep], _fix_signs(evecs[:, :keep].contiguous())


_threads_lock = threading.Lock()
_threads_depth = 0  # sections open in the process
_threads_saved = 1  # the process default before the first of them began
_threads_local = threading.local()  # sections open on this thread (nested ones change nothing)


@contextmanager
def one_torch_thread():
    """Run torch on this OS thread alone, then restore. With the OpenMP backend the intra-op thread
    count is per calling thread, plus a process default that threads read when they first use torch:
    the engine's own threads keep theirs, and the default is restored (to what it was before the
    first of overlapping sections began) when a section ends. One thread makes the results
    independent of the machine's core count, and is faster for these small ops on a busy CPU (two
    threads synchronising per op cost milliseconds each when another process holds a core)."""
    global _threads_depth, _threads_saved
    nested = getattr(_threads_local, "depth", 0)
    _threads_local.depth = nested + 1
    if nested:
        try:
            yield
        finally:
            _threads_local.depth = nested
        return
    with _threads_lock:
        if _threads_depth == 0:
            _threads_saved = torch.get_num_threads()
        _threads_depth += 1
        restore = _threads_saved
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _threads_local.depth = 0
        with _threads_lock:
            _threads_depth -= 1
        torch.set_num_threads(restore)


def round_embedding(e: torch.Tensor) -> torch.Tensor:
    return torch.round(e.double() * 10**EMBEDDING_DECIMALS) / 10**EMBEDDING_DECIMALS


def fit(
    experts: list[Expert], embeddings: torch.Tensor, options: FitOptions, *, model_config: ModelConfig,
    base_model: str, encoder_name: str,
) -> "CvaeGenerator":  # fmt: skip
    """Fit a generator on the experts (their LoRAs and description embeddings [N, dim])."""
    with one_torch_thread():
        return _fit(experts, embeddings, options, model_config=model_config, base_model=base_model, encoder_name=encoder_name)


def _fit(
    experts: list[Expert], embeddings: torch.Tensor, options: FitOptions, *, model_config: ModelConfig,
    base_model: str, encoder_name: str,
) -> "CvaeGenerator":  # fmt: skip
    started = time.perf_counter()
    options.check()
    n = len(experts)
    if not MIN_EXPERTS <= n <= MAX_EXPERTS:
        raise GenerationError(f"fitting a cvae generator needs {MIN_EXPERTS}..{MAX_EXPERTS} experts, got {n}")
    if embeddings.shape[0] != n or embeddings.dim() != 2:
        raise GenerationError(f"{n} experts but embeddings of shape {tuple(embeddings.shape)}")
    keys = sorted({key for e in experts for key in e.lora.modules})
    if not keys:
        raise GenerationError("the experts adapt no module")
    rank = options.rank or min(max(e.lora.rank for e in experts), options.basis_rank)
    # what the artifact will hold, bounded before any work: cores (N+1 rows with the PCA) and bases, float32
    numbers = 0
    for key in keys:
        d_in, d_out = module_dims(model_config, key[1])
        rank_sum = sum(e.lora.modules[key][0].shape[0] for e in experts if key in e.lora.modules)
        p_out, p_in = min(options.basis_rank, d_out, rank_sum), min(options.basis_rank, d_in, rank_sum)
        numbers += p_out * p_in * (n + 1) + d_out * p_out + d_in * p_in
    if numbers * 4 > MAX_ARTIFACT_BYTES:
        raise GenerationError(
            f"the generator would hold about {numbers * 4 / 2**20:.0f} MiB (above {MAX_ARTIFACT_BYTES >> 20} MiB): "
            "lower basis_rank, or fit on fewer experts or on experts that adapt fewer modules"
        )

    # per module: scaled factors in float64, shared bases, cores
    bases: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    cores: list[list[torch.Tensor]] = [[] for _ in experts]
    total_energy = kept_energy = 0.0
    for key in keys:
        d_in, d_out = module_dims(model_config, key[1])
        factors = []
        g_cols, h_cols = [], []
        for e in experts:
            entry = e.lora.modules.get(key)
            if entry is None:
                factors.append(None)
                continue
            a, b, scale = entry
            a, b = a.double(), b.double() * float(scale)
            factors.append((a, b))
            _, ra = torch.linalg.qr(a.T)  # a = raᵀ qaᵀ: ΔW ΔWᵀ = (b raᵀ)(b raᵀ)ᵀ
            _, rb = torch.linalg.qr(b)  # b = qb rb:    ΔWᵀ ΔW = (aᵀ rbᵀ)(aᵀ rbᵀ)ᵀ
            g_cols.append(b @ ra.T)
            h_cols.append(a.T @ rb.T)
            total_energy += float((g_cols[-1] ** 2).sum())
        p_mat = _sym_top(torch.cat(g_cols, dim=1), options.basis_rank)
        q_mat = _sym_top(torch.cat(h_cols, dim=1), options.basis_rank)
        if p_mat.shape[1] == 0 or q_mat.shape[1] == 0:  # every expert's update is zero here
            p_mat, q_mat = torch.zeros(d_out, 1, dtype=torch.float64), torch.zeros(d_in, 1, dtype=torch.float64)
        # store the bases in float32 and compute the cores against exactly what is stored
        p_mat, q_mat = p_mat.float().double(), q_mat.float().double()
        bases[key] = (p_mat, q_mat)
        for i, f in enumerate(factors):
            if f is None:
                cores[i].append(torch.zeros(p_mat.shape[1] * q_mat.shape[1], dtype=torch.float64))
            else:
                a, b = f
                core = (p_mat.T @ b) @ (a @ q_mat)
                kept_energy += float((core**2).sum())
                cores[i].append(core.reshape(-1))
    y = torch.stack([torch.cat(c) for c in cores])  # [N, D]

    # PCA of the cores (through the N×N Gram matrix)
    y_mean = y.mean(dim=0)
    yc = y - y_mean
    lam, u = _top_components(yc @ yc.T, n - 1)
    if lam.numel() == 0:
        raise GenerationError("the experts' updates are all identical in the shared basis: nothing to learn a distribution of")
    comps = (yc.T @ u / lam.sqrt()).T.contiguous()  # [K, D], orthonormal rows
    comps = comps.float().double()
    x_raw = yc @ comps.T  # [N, K]
    x_scale = float(x_raw.pow(2).sum(dim=1).mean().sqrt())
    x = x_raw / x_scale

    # condition: the description embeddings in the span of the experts' embeddings
    emb = round_embedding(embeddings)
    e_mean = emb.mean(dim=0)
    ec = emb - e_mean
    lam_c, u_c = _top_components(ec @ ec.T, n - 1)
    if lam_c.numel() == 0:
        raise GenerationError("every expert has the same description embedding: the condition cannot tell them apart")
    c_comps = (ec.T @ u_c / lam_c.sqrt()).T.contiguous()  # [Kc, dim]
    c_raw = ec @ c_comps.T
    c_scale = float(c_raw.pow(2).sum(dim=1).mean().sqrt())
    c = c_raw / c_scale

    model, report = _train(x, c, options)
    gen = CvaeGenerator(
        meta={
            "format": FORMAT,
            "encoder": encoder_name,
            "embedding_dim": int(embeddings.shape[1]),
            "base_model": base_model,
            "num_layers": model_config.num_layers,
            "modules": [[layer, module, int(bases[(layer, module)][0].shape[1]), int(bases[(layer, module)][1].shape[1])] for layer, module in keys],
            "rank": int(rank),
            "pca_components": int(comps.shape[0]),
            "condition_components": int(c_comps.shape[0]),
            "latent_dim": options.latent_dim,
            "hidden": options.hidden,
            "fit": {
                "epochs": options.epochs, "seed": options.seed, "basis_rank": options.basis_rank, "beta": options.beta,
                "lr": options.lr, "weight_decay": options.weight_decay,
                "energy_captured": round(kept_energy / total_energy, 6) if total_energy > 0 else 1.0,
                **report, "seconds": round(time.perf_counter() - started, 3),
            },  # fmt: skip
            "experts": [
                {"ref": e.ref, "version": e.version, "sha256": e.sha256,
                 "description_sha256": hashlib.sha256(e.description.encode()).hexdigest()}
                for e in experts
            ],  # fmt: skip
        },
        tensors={
            **{f"basis.{layer}.{module}.P": bases[(layer, module)][0].float() for layer, module in keys},
            **{f"basis.{layer}.{module}.Q": bases[(layer, module)][1].float() for layer, module in keys},
            "pca.mean": y_mean.float(),
            "pca.components": comps.float(),
            "pca.scale": torch.tensor([x_scale], dtype=torch.float64),
            "cond.mean": e_mean,
            "cond.components": c_comps,
            "cond.scale": torch.tensor([c_scale], dtype=torch.float64),
            "experts.x": x,
            "experts.c": c,
            **{f"cvae.{k}": v.detach().clone() for k, v in model.state_dict().items()},
        },
    )
    gen.check(model_config)
    return gen


def _train(x: torch.Tensor, c: torch.Tensor, o: FitOptions) -> tuple[CVAE, dict]:
    """Full-batch CVAE training in float64; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        model = CVAE(x.shape[1], c.shape[1], o.latent_dim, o.hidden).double()
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        warmup = max(1, int(0.3 * o.epochs))
        rec = kl = torch.zeros(())
        for epoch in range(o.epochs):
            mu, logvar = model.encode(x, c)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            x_hat = model.decode(z, c)
            rec = (x_hat - x).pow(2).sum(dim=1).mean()
            kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum(dim=1).mean()
            loss = rec + o.beta * min(1.0, (epoch + 1) / warmup) * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            mean_rec = (model.decode(torch.zeros(x.shape[0], o.latent_dim, dtype=x.dtype), c) - x).pow(2).sum(dim=1).mean()
    return model, {"reconstruction": round(float(rec.detach()), 6), "kl": round(float(kl.detach()), 6), "reconstruction_at_z0": round(float(mean_rec), 6)}


# -- the fitted generator ---------------------------------------------------------------------------
@dataclass
class CvaeGenerator:
    meta: dict
    tensors: dict[str, torch.Tensor]
    _model: CVAE | None = field(default=None, repr=False)

    name = NAME

    # files ------------------------------------------------------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        tensors = {k: v.contiguous() for k, v in sorted(self.tensors.items())}
        return {
            CONFIG_FILE: (json.dumps(self.meta, sort_keys=True, indent=1) + "\n").encode(),
            WEIGHTS_FILE: safetensors_save(tensors, metadata={"format": FORMAT}),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes], model_config: ModelConfig) -> "CvaeGenerator":
        """A stored generator, checked against its own description and the base model (ArtifactError)."""
        if set(files) != {CONFIG_FILE, WEIGHTS_FILE}:
            raise ArtifactError(f"a {FORMAT} generator is the files {CONFIG_FILE} and {WEIGHTS_FILE}, not {sorted(files)}")
        try:
            meta = json.loads(files[CONFIG_FILE])
        except (ValueError, RecursionError) as e:
            raise ArtifactError(f"{CONFIG_FILE} is not valid JSON ({e})") from None
        try:
            tensors = safetensors_load(files[WEIGHTS_FILE])
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
        gen = cls(meta=meta, tensors=tensors)
        gen.check(model_config)
        return gen

    def check(self, model_config: ModelConfig) -> None:
        m = self.meta
        try:
            if not isinstance(m, dict) or m.get("format") != FORMAT:
                raise ArtifactError(f"not a {FORMAT} generator (format {m.get('format') if isinstance(m, dict) else None!r})")
            ints = {k: m[k] for k in ("embedding_dim", "num_layers", "rank", "pca_components", "condition_components", "latent_dim", "hidden")}
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints.values()):
                raise ArtifactError("its sizes must be positive integers")
            if m["num_layers"] != model_config.num_layers:
                raise ArtifactError(f"it was fitted for a {m['num_layers']}-layer model, this one has {model_config.num_layers}")
            if ints["latent_dim"] > MAX_LATENT_DIM or ints["hidden"] > MAX_HIDDEN or ints["rank"] > MAX_BASIS_RANK:
                raise ArtifactError("its sizes are above this server's bounds")
            modules = m["modules"]
            if not isinstance(modules, list) or not modules:
                raise ArtifactError("it adapts no module")
            dim = 0
            seen = set()
            for entry in modules:
                if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], int) and entry[1] in ADAPTER_MODULES
                        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_BASIS_RANK for v in entry[2:])):
                    raise ArtifactError(f"bad module entry {str(entry)[:80]}")  # fmt: skip
                layer, module, po, pi = entry
                if not 0 <= layer < model_config.num_layers or (layer, module) in seen:
                    raise ArtifactError(f"bad module entry {entry}")
                seen.add((layer, module))
                d_in, d_out = module_dims(model_config, module)
                self._expect(f"basis.{layer}.{module}.P", (d_out, po), torch.float32)
                self._expect(f"basis.{layer}.{module}.Q", (d_in, pi), torch.float32)
                dim += po * pi
            k, kc, zd, h = ints["pca_components"], ints["condition_components"], ints["latent_dim"], ints["hidden"]
            self._expect("pca.mean", (dim,), torch.float32)
            self._expect("pca.components", (k, dim), torch.float32)
            self._expect("pca.scale", (1,), torch.float64)
            self._expect("cond.mean", (ints["embedding_dim"],), torch.float64)
            self._expect("cond.components", (kc, ints["embedding_dim"]), torch.float64)
            self._expect("cond.scale", (1,), torch.float64)
            model = CVAE(k, kc, zd, h).double()
            state = model.state_dict()
            for name, t in state.items():
                self._expect(f"cvae.{name}", tuple(t.shape), torch.float64)
            extra = set(self.tensors) - {f"cvae.{n}" for n in state} - {"pca.mean", "pca.components", "pca.scale", "cond.mean", "cond.components", "cond.scale", "experts.x", "experts.c"}
            extra -= {f"basis.{layer}.{module}.{w}" for layer, module, _, _ in modules for w in "PQ"}
            if extra:
                raise ArtifactError(f"unexpected tensors {sorted(extra)[:3]}")
            for name, t in self.tensors.items():
                if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                    raise ArtifactError(f"tensor {name} is not finite floating point")
            if not (float(self.tensors["pca.scale"][0]) > 0 and float(self.tensors["cond.scale"][0]) > 0):
                raise ArtifactError("its scales must be positive")
            model.load_state_dict({n: self.tensors[f"cvae.{n}"] for n in state})
            model.eval()
            self._model = model
        except (KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"its description is incomplete ({type(e).__name__}: {str(e)[:80]})") from None

    def _expect(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        t = self.tensors.get(name)
        if t is None:
            raise ArtifactError(f"tensor {name} is missing")
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ArtifactError(f"tensor {name} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")

    # sampling ---------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def experts(self) -> list[dict]:
        return list(self.meta.get("experts", []))

    def condition(self, embedding: torch.Tensor) -> torch.Tensor:
        e = round_embedding(embedding.reshape(-1))
        if e.shape[0] != self.meta["embedding_dim"]:
            raise GenerationError(f"the description embedding has {e.shape[0]} dimensions, the generator {self.meta['embedding_dim']}")
        t = self.tensors
        return ((e - t["cond.mean"]) @ t["cond.components"].T) / t["cond.scale"][0]

    def latent(self, seed: int) -> torch.Tensor:
        zd = int(self.meta["latent_dim"])
        if seed == 0:
            return torch.zeros(zd, dtype=torch.float64)
        return torch.randn(zd, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)

    @torch.no_grad()
    def deltas(self, embedding: torch.Tensor, seed: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """{(layer, module): (A [r, d_in], B [d_out, r])} in float64, scale 1, for the description embedding."""
        assert self._model is not None, "check() first"
        t = self.tensors
        x = self._model.decode(self.latent(seed).unsqueeze(0), self.condition(embedding).unsqueeze(0))[0]
        y = t["pca.mean"].double() + (x * t["pca.scale"][0]) @ t["pca.components"].double()
        out, offset = {}, 0
        for layer, module, po, pi in self.meta["modules"]:
            core = y[offset : offset + po * pi].reshape(po, pi)
            offset += po * pi
            p_mat, q_mat = t[f"basis.{layer}.{module}.P"].double(), t[f"basis.{layer}.{module}.Q"].double()
            u, s, vh = torch.linalg.svd(core, full_matrices=False)
            r = min(self.rank, s.shape[0])
            u, s, vh = u[:, :r], s[:r], vh[:r]
            signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(r)])
            signs[signs == 0] = 1
            u, vh = u * signs, vh * signs.unsqueeze(1)
            root = s.clamp(min=0).sqrt()
            out[(layer, module)] = ((root.unsqueeze(1) * vh) @ q_mat.T, p_mat @ (u * root))
        return out

    def generate(self, embedding: torch.Tensor, seed: int, max_rank: int | None = None) -> dict[str, bytes]:
        """PEFT LoRA files (adapter_config.json, adapter_model.safetensors) for the description embedding."""
        if max_rank is not None and self.rank > max_rank:
            raise RankOverflow(f"the generator writes rank-{self.rank} adapters, above this server's --max-lora-rank {max_rank}; refit it with a smaller rank")
        with one_torch_thread():
            modules = {key: (a.float(), b.float()) for key, (a, b) in self.deltas(embedding, seed).items()}
        if any(not bool(torch.isfinite(a).all() and torch.isfinite(b).all()) for a, b in modules.values()):
            raise GenerationError("the generator produced non-finite weights for this description")
        return peft_lora_files(modules, int(self.meta["num_layers"]), str(self.meta.get("base_model", "")))
