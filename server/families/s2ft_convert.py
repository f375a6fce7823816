"""Turn a full S²FT fine-tuned checkpoint into a compact S²FT adapter (the diff against its base model).

``hotswap convert s2ft --base DIR --finetuned DIR --out DIR [--atol X]``

Both checkpoints are Hugging Face directories of safetensors shards. They are read one tensor at a time
(never two full models in memory). Only the decoder's linear weights
``model.layers.{i}.{self_attn|mlp}.{q,k,v,o,gate,up,down}_proj.weight`` may differ; every other tensor
(embeddings, norms, lm_head, biases) must be identical. For each changed linear weight the rows or the
columns that hold a change are stored, whichever needs fewer numbers.

Exactness. With ``atol == 0`` the adapter reproduces the fine-tuned weights bit for bit under the merge rule
of `apply_s2ft_delta` (add in the delta's dtype, round once to the checkpoint's dtype), and the converter
proves it: it re-reads the written files and checks ``base + dense_delta == finetuned`` for every linear
weight. The plain difference ``ft - base`` in the checkpoint's dtype is not always enough: where a weight
shrinks by more than half (typically a small weight that changes sign), the spacing of representable deltas
is coarser than the spacing of representable results, and no delta in that dtype makes ``base + delta``
land on ``ft``. The converter first tries the neighbours of ``ft - base`` (it sometimes helps near binade
edges) and otherwise stores that module's delta in the next wider dtype (float32 for bfloat16/float16
checkpoints, float64 for float32 ones), where the difference of two narrower numbers is exact unless their
exponents differ by more than (wide precision - narrow precision - 1) bits: 28 for float32 in float64, 15
for bfloat16 and 12 for float16 in float32 (then float64 is tried: 44 and 41 bits, which float16 cannot
exceed). It reports every widened module. With ``atol > 0`` a change of at most ``atol`` counts as no
change, the checkpoint's dtype is kept wherever the merged weight is within ``atol`` of the fine-tuned one,
and the verification checks exactly that bound. ``--delta-dtype`` forces one dtype instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from server.families.s2ft_format import (
    CONFIG_FILE,
    S2FT_MODULES,
    WEIGHTS_FILE,
    S2FTModuleDelta,
    dense_delta,
    parse_s2ft_files,
    save_s2ft_adapter,
)
from server.lora.peft import AdapterError

_LINEAR = re.compile(r"^model\.layers\.(0|[1-9][0-9]*)\.(self_attn|mlp)\.(" + "|".join(S2FT_MODULES) + r")\.weight$")
_FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
_NUDGE_STEPS = 3  # neighbours of ft - base tried on each side (a working delta, if any, is within 2)


class ConvertError(ValueError):
    """The two checkpoints cannot be turned into an S²FT adapter; the message says why."""


@dataclass(slots=True)
class ModuleChange:
    layer: int
    module: str
    kind: str  # "row" | "col"
    k: int
    d_out: int
    d_in: int
    dtype: str  # dtype the delta is stored in
    checkpoint_dtype: str
    changed_entries: int  # weights whose value changed (by more than atol)
    nudged: int  # entries whose stored delta is a neighbour of ft - base, not ft - base itself

    @property
    def stored_numbers(self) -> int:
        return self.k * (self.d_in if self.kind == "row" else self.d_out)

    @property
    def widened(self) -> bool:
        return self.dtype != self.checkpoint_dtype


@dataclass(slots=True)
class ConvertReport:
    out_dir: Path
    atol: float
    num_linear: int  # linear weights compared
    auto_dtype: bool = True  # each module's delta dtype chosen by the converter
    modules: list[ModuleChange] = field(default_factory=list)
    adapter_bytes: int = 0  # size of adapter_model.safetensors on disk
    finetuned_linear_bytes: int = 0  # bytes of all linear weights of the fine-tuned checkpoint
    max_abs_error: float = 0.0  # largest |merged - finetuned| over all linear weights (0 when exact)

    @property
    def exact(self) -> bool:
        return self.atol == 0

    @property
    def compression_ratio(self) -> float:
        return self.finetuned_linear_bytes / self.adapter_bytes if self.adapter_bytes else math.inf

    @property
    def kinds(self) -> dict[tuple[int, str], tuple[str, int]]:
        """(layer, module) -> (kind, k)."""
        return {(m.layer, m.module): (m.kind, m.k) for m in self.modules}

    def format(self) -> str:
        lines = [f"S2FT adapter written to {self.out_dir}"]
        lines.append(f"  changed linear weights: {len(self.modules)} of {self.num_linear}")
        lines.append(f"  {'layer':>5}  {'module':<9}  {'kind':<4}  {'k':>6}  {'weight':>11}  {'dtype':<8}  {'changed':>9}  stored")
        for m in self.modules:
            shape = f"{m.d_out}x{m.d_in}"
            lines.append(
                f"  {m.layer:>5}  {m.module:<9}  {m.kind:<4}  {m.k:>6}  {shape:>11}  {m.dtype:<8}  "
                f"{m.changed_entries:>9}  {m.stored_numbers}"
            )
        lines.append(
            f"  adapter: {_human(self.adapter_bytes)} ({self.adapter_bytes} bytes); fine-tuned linear weights: "
            f"{_human(self.finetuned_linear_bytes)}; compression {self.compression_ratio:.1f}x"
        )
        if self.exact:
            lines.append(f"  verified: base + delta == fine-tuned, bit-exact, for all {self.num_linear} linear weights")
        else:
            lines.append(
                f"  verified: |base + delta - fine-tuned| <= atol={self.atol:g} for all {self.num_linear} linear weights "
                f"(max error {self.max_abs_error:.3g})"
            )
        widened = [m for m in self.modules if m.widened]
        if widened and self.auto_dtype:
            lines.append(
                f"  note: {len(widened)} module(s) store their delta in a wider dtype than the checkpoint's, because "
                "no delta in the checkpoint's dtype makes base + delta equal the fine-tuned weight for some entries "
                "(weights that shrank by more than half); merge in the delta's dtype and round once. "
                "A small --atol keeps the checkpoint's dtype."
            )
        nudged = sum(m.nudged for m in self.modules)
        if nudged:
            lines.append(f"  note: {nudged} delta entries are a neighbour of ft - base, chosen so that base + delta rounds to ft")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class _Checkpoint:
    """Lazy access to every tensor of a directory of safetensors shards."""

    def __init__(self, path: Path, role: str, stack: contextlib.ExitStack):
        self.path, self.role = Path(path), role
        if not self.path.is_dir():
            raise ConvertError(f"{role} checkpoint {self.path} is not a directory")
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            hint = " (pickled .bin checkpoints are never read: save it with safe_serialization=True)" if any(self.path.glob("*.bin")) else ""
            raise ConvertError(f"{role} checkpoint {self.path} holds no .safetensors files{hint}")
        self.where: dict[str, object] = {}
        for shard in shards:
            try:
                handle = stack.enter_context(safe_open(str(shard), framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors raises several types
                raise ConvertError(f"{role} checkpoint: {shard} is not a readable safetensors file ({e})") from None
            for key in handle.keys():
                if key in self.where:
                    raise ConvertError(f"{role} checkpoint: tensor {key} appears in more than one shard")
                self.where[key] = handle

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.where[key].get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def num_layers(self) -> int | None:
        cfg = self.path / "config.json"
        try:
            n = json.loads(cfg.read_text()).get("num_hidden_layers")
        except (OSError, ValueError, AttributeError):
            return None
        return n if isinstance(n, int) else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _wider_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The checkpoint's dtype first, then wider float dtypes to fall back on."""
    order = [torch.float32, torch.float64]
    if dtype not in _FLOAT_DTYPES.values():
        raise ConvertError(f"linear weights of dtype {dtype} are not supported (expected a floating point dtype)")
    return [dtype] + [t for t in order if torch.finfo(t).eps < torch.finfo(dtype).eps]


def _abs_err(merged: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    return (merged.to(torch.float64) - ft.to(torch.float64)).abs()


def _fit_delta(base_s: torch.Tensor, ft_s: torch.Tensor, dtype: torch.dtype, atol: float) -> tuple[torch.Tensor, int, int, float]:
    """A delta in ``dtype`` such that base + delta, added in the wider of the two dtypes and rounded once to
    the checkpoint's dtype (the `apply_s2ft_delta` rule), is as close to ft as that dtype allows.

    Returns (delta, entries still off by more than atol, entries nudged off ft - base, max error)."""
    ck = base_s.dtype
    acc = torch.promote_types(ck, dtype)
    b = base_s.to(acc)
    delta = (ft_s.to(acc) - b).to(dtype)
    off = (b + delta.to(acc)).to(ck) != ft_s
    if not bool(off.any()):
        return delta, 0, 0, 0.0
    idx = off.nonzero(as_tuple=True)
    bb, ff, d0 = b[idx], ft_s[idx], delta[idx]
    best, best_err = d0, _abs_err((bb + d0.to(acc)).to(ck), ff)
    lo = hi = d0
    up, down = torch.full_like(d0, math.inf), torch.full_like(d0, -math.inf)
    # (b + d) rounded is monotone in d, so when no neighbour within a few steps hits ft, no delta does.
    for _ in range(_NUDGE_STEPS):
        lo, hi = torch.nextafter(lo, down), torch.nextafter(hi, up)
        for cand in (lo, hi):
            err = _abs_err((bb + cand.to(acc)).to(ck), ff)
            better = err < best_err
            best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    delta[idx] = best
    return delta, int((best_err > atol).sum()), int((best != d0).sum()), float(best_err.max())


def _describe_off(base_s: torch.Tensor, ft_s: torch.Tensor, delta: torch.Tensor) -> str:
    """The worst entry, for error messages."""
    acc = torch.promote_types(base_s.dtype, delta.dtype)
    err = _abs_err((base_s.to(acc) + delta.to(acc)).to(base_s.dtype), ft_s).flatten()
    i = int(err.argmax())
    return f"e.g. base {base_s.flatten()[i].item()!r} -> fine-tuned {ft_s.flatten()[i].item()!r}, off by {err[i].item():.3g}"


def convert_s2ft(
    base_dir: Path,
    finetuned_dir: Path,
    out_dir: Path,
    *,
    atol: float = 0.0,
    delta_dtype: torch.dtype | None = None,
    base_model: str | None = None,
    progress: bool = True,
) -> ConvertReport:
    """Write the S²FT adapter ``finetuned - base`` into ``out_dir``, verify it, and report on it.

    ``atol``: changes of at most ``atol`` are dropped and the merged weights need only be within ``atol``
    of the fine-tuned ones; 0 (the default) means bit-exact. ``delta_dtype``: None (auto) stores each module's
    delta in the narrowest of (checkpoint dtype, float32, float64) that meets ``atol``; a dtype forces that
    one and fails where it cannot meet ``atol``. ``base_model`` goes into
    ``base_model_name_or_path`` (default: ``base_dir`` as given). Raises `ConvertError`."""
    base_dir, finetuned_dir, out_dir = Path(base_dir), Path(finetuned_dir), Path(out_dir)
    if not (math.isfinite(atol) and atol >= 0):
        raise ConvertError(f"atol must be a finite number >= 0, got {atol}")
    if delta_dtype is not None and delta_dtype not in _FLOAT_DTYPES.values():
        raise ConvertError(f"delta_dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {delta_dtype}")
    for d in (base_dir, finetuned_dir):
        if out_dir.exists() and d.exists() and out_dir.resolve() == d.resolve():
            raise ConvertError(f"--out {out_dir} is one of the input checkpoints; write the adapter to its own directory")

    with contextlib.ExitStack() as stack:
        base = _Checkpoint(base_dir, "base", stack)
        ft = _Checkpoint(finetuned_dir, "fine-tuned", stack)
        linear, others, dims, num_layers = _compare_layout(base, ft)

        report = ConvertReport(out_dir=out_dir, atol=atol, num_linear=len(linear), auto_dtype=delta_dtype is None)
        deltas: dict[tuple[int, str], S2FTModuleDelta] = {}
        bar = tqdm(total=len(others) + len(linear), desc="s2ft diff", unit="tensor", disable=not progress)
        with bar:
            for key in others:
                if not torch.equal(base.get(key), ft.get(key)):
                    raise ConvertError(
                        f"{key} differs between the base and the fine-tuned checkpoint: S2FT only covers the linear "
                        f"layers ({', '.join(S2FT_MODULES)} weights of the decoder layers); embeddings, norms, "
                        "lm_head and biases must be unchanged"
                    )
                bar.update()
            for key, (layer, module) in linear.items():
                b, f = base.get(key), ft.get(key)
                report.finetuned_linear_bytes += f.nbytes
                change = _diff_module(b, f, layer, module, atol, delta_dtype)
                bar.update()
                if change is None:
                    continue
                mc, d = change
                report.modules.append(mc)
                deltas[(layer, module)] = d
        if not deltas:
            what = "identical" if atol == 0 else f"equal within atol={atol:g}"
            raise ConvertError(f"the base and the fine-tuned checkpoint are {what}: there is nothing to convert")

        save_s2ft_adapter(out_dir, deltas, base_model if base_model is not None else str(base_dir))
        report.adapter_bytes = (out_dir / WEIGHTS_FILE).stat().st_size
        report.max_abs_error = _verify(out_dir, base, ft, linear, dims, num_layers, deltas, atol, progress)
    return report


def _compare_layout(base: _Checkpoint, ft: _Checkpoint):
    """Same keys, shapes and dtypes; linear weights keyed in layer order; each module's (d_in, d_out)."""
    bk, fk = base.keys(), ft.keys()
    if bk != fk:
        only_b, only_f = sorted(bk - fk), sorted(fk - bk)
        parts = []
        if only_b:
            parts.append(f"only in base: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}")
        if only_f:
            parts.append(f"only in fine-tuned: {', '.join(only_f[:5])}{' ...' if len(only_f) > 5 else ''}")
        raise ConvertError(f"the checkpoints hold different tensors ({'; '.join(parts)}); an S2FT checkpoint keeps every tensor of its base")
    for key in sorted(bk):
        if base.shape(key) != ft.shape(key):
            raise ConvertError(
                f"{key} has shape {list(base.shape(key))} in the base but {list(ft.shape(key))} in the fine-tuned "
                "checkpoint: they are not the same architecture (S2FT keeps every shape)"
            )
        if base.dtype(key) != ft.dtype(key):
            raise ConvertError(
                f"{key} is {base.dtype(key)} in the base but {ft.dtype(key)} in the fine-tuned checkpoint; "
                "save both in the same dtype"
            )
    linear: dict[str, tuple[int, str]] = {}
    for key in bk:
        m = _LINEAR.match(key)
        if m is None:
            continue
        layer, parent, module = int(m.group(1)), m.group(2), m.group(3)
        if (parent == "mlp") != (module in ("gate_proj", "up_proj", "down_proj")):
            continue  # not a Llama-layout linear: treated as an "other" tensor that must be unchanged
        linear[key] = (layer, module)
    if not linear:
        raise ConvertError("no Llama-family linear weights (model.layers.N.{self_attn|mlp}.*_proj.weight) in the checkpoints")
    others = sorted(bk - set(linear))
    linear = dict(sorted(linear.items(), key=lambda kv: (kv[1][0], S2FT_MODULES.index(kv[1][1]))))
    dims: dict[str, tuple[int, int]] = {}
    for key, (layer, module) in linear.items():
        shape = base.shape(key)
        if len(shape) != 2:
            raise ConvertError(f"{key} has shape {list(shape)}; a linear weight is 2-D")
        d_out, d_in = shape
        if dims.setdefault(module, (d_in, d_out)) != (d_in, d_out):
            raise ConvertError(f"{module} has different shapes in different layers ({key}: {list(shape)}); the S2FT format needs one shape per module")
    top = max(layer for layer, _ in linear.values()) + 1
    num_layers = max(base.num_layers() or 0, top)
    return linear, others, dims, num_layers


def _diff_module(b: torch.Tensor, f: torch.Tensor, layer: int, module: str, atol: float, delta_dtype: torch.dtype | None):
    what = f"layer {layer} {module}"
    if torch.equal(b, f):  # the common case, and cheap
        return None
    # NaN != NaN, so a NaN anywhere lands in a stored row/column and is refused below; an equal inf is no change
    changed = (f != b) if atol == 0 else (f.to(torch.float64) - b.to(torch.float64)).abs() > atol
    rows = changed.any(dim=1).nonzero().flatten()
    if rows.numel() == 0:
        return None
    cols = changed.any(dim=0).nonzero().flatten()
    d_out, d_in = b.shape
    kind = "row" if rows.numel() * d_in <= d_out * cols.numel() else "col"
    idx = rows if kind == "row" else cols
    b_s, f_s = (b[idx], f[idx]) if kind == "row" else (b[:, idx], f[:, idx])
    if not (bool(torch.isfinite(b_s).all()) and bool(torch.isfinite(f_s).all())):
        raise ConvertError(f"{what}: the changed weights hold NaN or infinite values")
    candidates = _wider_dtypes(b.dtype) if delta_dtype is None else [delta_dtype]
    for dtype in candidates:
        delta, remaining, nudged, err = _fit_delta(b_s, f_s, dtype, atol)
        if remaining == 0:
            break
    else:
        how = "even in" if delta_dtype is None else "with deltas in"
        bound = "exactly" if atol == 0 else f"within atol={atol:g} (max error {err:.3g})"
        raise ConvertError(
            f"{what}: {remaining} changed entries cannot be reproduced {bound} as base + delta {how} "
            f"{_dtype_name(dtype)} ({_describe_off(b_s, f_s, delta)}); "
            + ("pass an --atol to accept the nearest representable values" if delta_dtype is None
               else "leave --delta-dtype at auto or pass a larger --atol")
        )
    mc = ModuleChange(
        layer=layer, module=module, kind=kind, k=int(idx.numel()), d_out=d_out, d_in=d_in,
        dtype=_dtype_name(delta.dtype), checkpoint_dtype=_dtype_name(b.dtype),
        changed_entries=int(changed.sum()), nudged=nudged,
    )
    return mc, S2FTModuleDelta(kind=kind, indices=idx.to(torch.int64), delta=delta.contiguous())


def _verify(out_dir, base, ft, linear, dims, num_layers, deltas, atol, progress) -> float:
    """Re-read the written adapter and check base + dense_delta against every fine-tuned linear weight."""
    files = {name: (out_dir / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    try:
        parsed = parse_s2ft_files(files, str(out_dir), lambda m: dims[m], num_layers)
    except AdapterError as e:
        raise ConvertError(f"verification failed: the written adapter does not parse: {e}") from None
    if set(parsed) != set(deltas):
        raise ConvertError(f"verification failed: the written adapter holds modules {sorted(parsed)}, expected {sorted(deltas)}")
    worst = 0.0
    for key, (layer, module) in tqdm(linear.items(), desc="s2ft verify", unit="tensor", disable=not progress):
        b, f = base.get(key), ft.get(key)
        d = parsed.get((layer, module))
        if d is None:
            merged = b
        else:
            dense = dense_delta(d, *b.shape)
            wide = torch.promote_types(b.dtype, dense.dtype)
            merged = (b.to(wide) + dense.to(wide)).to(b.dtype)
        if atol == 0:
            if not torch.equal(merged, f):
                n = int((merged != f).sum())
                raise ConvertError(f"verification failed: {key}: base + delta differs from the fine-tuned weight in {n} entries")
        else:
            err = float(_abs_err(merged, f).max())
            if not err <= atol:
                raise ConvertError(f"verification failed: {key}: base + delta is off by {err:.3g} > atol={atol:g}")
            worst = max(worst, err)
    return worst


def build_parser() -> argparse.ArgumentParser:
    """The converter's own parser (`python -m server.families.s2ft_convert`); the options are those of
    `hotswap convert s2ft`, defined once in the torch-free server.cli."""
    from server.cli import S2FT_CONVERT_DESCRIPTION, add_s2ft_convert_arguments

    p = argparse.ArgumentParser(prog="hotswap convert s2ft", description=S2FT_CONVERT_DESCRIPTION)
    add_s2ft_convert_arguments(p)
    return p


def main_convert(argv: list[str] | None = None) -> int:
    """`hotswap convert s2ft ...`: 0 on success, 1 when the checkpoints cannot be converted, 2 on bad arguments."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    return run_convert(args)


def run_convert(args: argparse.Namespace) -> int:
    """Convert as parsed by `add_s2ft_convert_arguments`: 0 on success, 1 (one line on stderr) when the
    checkpoints cannot be converted."""
    try:
        report = convert_s2ft(
            args.base, args.finetuned, args.out, atol=args.atol,
            delta_dtype=None if args.delta_dtype == "auto" else _FLOAT_DTYPES[args.delta_dtype],
            base_model=args.base_model_name, progress=not args.no_progress,
        )
    except (ConvertError, OSError) as e:
        print(f"hotswap convert s2ft: error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_convert())
