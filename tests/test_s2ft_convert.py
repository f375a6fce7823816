"""S²FT adapters: the converter turns a full fine-tuned checkpoint into row/column deltas that reproduce it
exactly, and the file parser refuses every malformed adapter with a clear error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

from server.families.s2ft_convert import ConvertError, _fit_delta, convert_s2ft, main_convert
from server.families.s2ft_format import (
    S2FTModuleDelta,
    apply_s2ft_delta,
    dense_delta,
    load_s2ft_adapter,
    parse_s2ft_files,
    s2ft_key,
    save_s2ft_adapter,
)
from server.lora.peft import AdapterError

# d_in, d_out of the tiny Llama below (hidden 64, intermediate 128, 4 heads of 16, 2 KV heads)
DIMS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
NUM_LAYERS = 2
# (layer, module) -> (kind the converter must pick, changed rows/cols, how the fine-tuned values are made)
CHANGES = {
    (0, "v_proj"): ("row", [1, 5, 30], "scale"),
    (0, "up_proj"): ("row", [0, 17, 127], "add"),
    (1, "o_proj"): ("col", [2, 3, 40], "scale"),
    (1, "down_proj"): ("col", [5, 64, 100, 127], "add"),
    (1, "v_proj"): ("row", [31], "add"),
}
# A planted entry no float32 delta can reproduce: base 1.0 -> fine-tuned 0.25 + 2^-25. Every float32 d near
# -0.75 is a multiple of 2^-24, and 1.0 + d is exact there, so 1.0 + d skips the odd multiple of 2^-25.
PLANT = (0, "up_proj", 17, 3, 1.0, 0.25 + 2.0**-25)


def wkey(layer: int, module: str) -> str:
    return s2ft_key(layer, module) + ".weight"


def dims(module: str) -> tuple[int, int]:
    return DIMS[module]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("s2ft")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    layer, module, r, c, b_val, _ = PLANT
    with torch.no_grad():
        model.get_parameter(wkey(layer, module))[r, c] = b_val
    model.save_pretrained(root / "base")

    sd = load_file(root / "base" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for (layer, module), (kind, idx, how) in CHANGES.items():
        w = sd[wkey(layer, module)]
        sl = (idx, slice(None)) if kind == "row" else (slice(None), idx)
        part = w[sl]
        if how == "scale":  # ft within [base/2, 2 base]: ft - base is exact in float32 (Sterbenz)
            new = part * (0.6 + 0.9 * torch.rand(part.shape, generator=gen))
        else:  # arbitrary values: some sign changes, so ft - base is not always exact in float32
            new = (part.double() + 0.05 * torch.randn(part.shape, generator=gen, dtype=torch.float64)).float()
        w[sl] = new
    sd[wkey(layer := PLANT[0], PLANT[1])][PLANT[2], PLANT[3]] = PLANT[5]
    (root / "ft").mkdir()
    save_file(sd, root / "ft" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(root / "base" / "config.json", root / "ft" / "config.json")
    return root


@pytest.fixture(scope="module")
def converted(ckpts):
    report = convert_s2ft(ckpts / "base", ckpts / "ft", ckpts / "adapter", progress=False)
    return report, ckpts / "adapter"


def test_report_kinds_k_and_sizes(converted, ckpts):
    report, out = converted
    assert report.kinds == {key: (kind, len(idx)) for key, (kind, idx, _) in CHANGES.items()}
    assert report.exact and report.num_linear == 7 * NUM_LAYERS
    by = {(m.layer, m.module): m for m in report.modules}
    # exact float32 differences stay float32; the planted entry forces float64 for its module
    assert by[(0, "v_proj")].dtype == by[(1, "o_proj")].dtype == "float32"
    assert by[(0, "up_proj")].dtype == "float64" and by[(0, "up_proj")].widened
    assert report.adapter_bytes == (out / "adapter_model.safetensors").stat().st_size
    ft = load_file(ckpts / "ft" / "model.safetensors")
    assert report.finetuned_linear_bytes == sum(ft[wkey(i, m)].nbytes for i in range(NUM_LAYERS) for m in DIMS)
    assert report.compression_ratio > 10
    text = report.format()
    assert "bit-exact" in text and "wider dtype" in text


def test_files_parse_and_reproduce_the_finetuned_weights_exactly(converted, ckpts):
    _, out = converted
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg == {"peft_type": "S2FT", "hotswap_family": "s2ft", "format_version": 1,
                   "base_model_name_or_path": str(ckpts / "base"),
                   "target_modules": ["down_proj", "o_proj", "up_proj", "v_proj"]}
    raw = st_load((out / "adapter_model.safetensors").read_bytes())
    assert raw["model.layers.1.mlp.down_proj.s2_col_indices"].dtype == torch.int32
    assert raw["model.layers.1.mlp.down_proj.s2_col_delta"].shape == (64, 4)
    assert raw["model.layers.0.self_attn.v_proj.s2_row_delta"].shape == (3, 64)

    deltas = load_s2ft_adapter(out, "a", dims, NUM_LAYERS)
    assert set(deltas) == set(CHANGES)
    for (layer, module), (kind, idx, _) in CHANGES.items():
        assert deltas[(layer, module)].kind == kind and deltas[(layer, module)].indices.tolist() == idx
        assert deltas[(layer, module)].indices.dtype == torch.int64
    base = load_file(ckpts / "base" / "model.safetensors")
    ft = load_file(ckpts / "ft" / "model.safetensors")
    for layer in range(NUM_LAYERS):
        for module, (d_in, d_out) in DIMS.items():
            b, f = base[wkey(layer, module)], ft[wkey(layer, module)]
            d = deltas.get((layer, module))
            if d is None:
                assert torch.equal(b, f)
                continue
            dense = dense_delta(d, d_out, d_in)
            assert dense.shape == (d_out, d_in)
            merged = (b.to(dense.dtype) + dense).to(b.dtype)
            assert torch.equal(merged, f), (layer, module)
            assert torch.equal(apply_s2ft_delta(b, d), f)
    # why float64 was needed: no float32 delta reproduces the planted entry
    layer, module, r, c, b_val, f_val = PLANT
    d32 = torch.tensor(f_val, dtype=torch.float32) - torch.tensor(b_val, dtype=torch.float32)
    assert torch.tensor(b_val, dtype=torch.float32) + d32 != torch.tensor(f_val, dtype=torch.float32)


def test_hf_logits_of_finetuned_equal_base_with_merged_deltas(converted, ckpts):
    from transformers import LlamaForCausalLM

    _, out = converted
    deltas = load_s2ft_adapter(out, "a", dims, NUM_LAYERS)
    ft_model = LlamaForCausalLM.from_pretrained(ckpts / "ft", dtype=torch.float32).eval()
    merged_model = LlamaForCausalLM.from_pretrained(ckpts / "base", dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base_logits = merged_model(ids).logits
        for (layer, module), d in deltas.items():
            w = merged_model.get_parameter(wkey(layer, module))
            w.copy_((w.to(d.delta.dtype) + dense_delta(d, *w.shape)).to(w.dtype))
        assert torch.equal(merged_model(ids).logits, ft_model(ids).logits)
        assert not torch.allclose(base_logits, ft_model(ids).logits)


def test_atol_keeps_checkpoint_dtype_and_drops_tiny_changes(ckpts, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(ckpts / "ft", ft)
    sd = load_file(ft / "model.safetensors")
    sd[wkey(0, "q_proj")][4, 4] += 1e-7  # below atol: dropped
    save_file(sd, ft / "model.safetensors", metadata={"format": "pt"})
    report = convert_s2ft(ckpts / "base", ft, tmp_path / "a", atol=1e-6, progress=False)
    assert set(report.kinds) == set(CHANGES)
    assert all(m.dtype == "float32" for m in report.modules)
    assert 0 < report.max_abs_error <= 1e-6  # the planted entry is off by 2^-25
    exact = convert_s2ft(ckpts / "base", ft, tmp_path / "b", progress=False)
    assert exact.kinds[(0, "q_proj")] == ("row", 1)


def test_sharded_checkpoints(ckpts, tmp_path):
    sd = load_file(ckpts / "ft" / "model.safetensors")
    keys = sorted(sd)
    (tmp_path / "ft").mkdir()
    save_file({k: sd[k] for k in keys[::2]}, tmp_path / "ft" / "model-00001-of-00002.safetensors")
    save_file({k: sd[k] for k in keys[1::2]}, tmp_path / "ft" / "model-00002-of-00002.safetensors")
    report = convert_s2ft(ckpts / "base", tmp_path / "ft", tmp_path / "a", progress=False)
    assert report.kinds == {key: (kind, len(idx)) for key, (kind, idx, _) in CHANGES.items()}


def test_cli(ckpts, tmp_path, capsys):
    rc = main_convert(["--base", str(ckpts / "base"), "--finetuned", str(ckpts / "ft"), "--out", str(tmp_path / "a"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bit-exact" in text and "compression" in text and "up_proj" in text
    assert main_convert(["--base", str(ckpts / "base")]) == 2
    rc = main_convert(["--base", str(tmp_path / "nope"), "--finetuned", str(ckpts / "ft"), "--out", str(tmp_path / "b")])
    assert rc == 1 and "not a directory" in capsys.readouterr().err


# ---------- converter errors ----------

def _variant(ckpts, tmp_path, edit) -> object:
    dst = tmp_path / "variant"
    shutil.copytree(ckpts / "ft", dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])
    return edit


@pytest.mark.parametrize("edit, match", [
    (_set("model.embed_tokens.weight", lambda t: t + 1e-3), r"model\.embed_tokens\.weight differs.*S2FT only covers the linear"),
    (_set("model.layers.1.input_layernorm.weight", lambda t: t * 2), r"input_layernorm\.weight differs.*only covers the linear"),
    (_set("lm_head.weight", lambda t: t.flip(0)), r"lm_head\.weight differs.*only covers the linear"),
    (_set(wkey(0, "up_proj"), lambda t: t[:120].contiguous()), r"up_proj\.weight has shape \[128, 64\] in the base but \[120, 64\].*not the same architecture"),
    (_set(wkey(0, "q_proj"), lambda t: t.double()), r"q_proj\.weight is F32 in the base but F64.*same dtype"),
    (lambda sd: sd.pop("model.norm.weight"), r"different tensors \(only in base: model\.norm\.weight"),
    (lambda sd: sd.update(extra=torch.zeros(2)), r"different tensors \(only in fine-tuned: extra"),
    (_set(wkey(1, "k_proj"), lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))), r"NaN or infinite"),
])
def test_convert_refuses(ckpts, tmp_path, edit, match):
    with pytest.raises(ConvertError, match=match):
        convert_s2ft(ckpts / "base", _variant(ckpts, tmp_path, edit), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_refuses_identical_and_bad_inputs(ckpts, tmp_path):
    with pytest.raises(ConvertError, match="identical: there is nothing to convert"):
        convert_s2ft(ckpts / "base", ckpts / "base", tmp_path / "a", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConvertError, match="no .safetensors files.*pickled"):
        convert_s2ft(ckpts / "base", tmp_path / "empty", tmp_path / "a", progress=False)
    with pytest.raises(ConvertError, match="atol"):
        convert_s2ft(ckpts / "base", ckpts / "ft", tmp_path / "a", atol=-1.0, progress=False)


def test_fit_delta_exact_or_widened():
    """Random pairs over many magnitudes. In the checkpoint's dtype base + delta == ft often has no solution.
    In a dtype with q significand bits (narrow: p) ft - base is exact when the exponents differ by at most
    q - p - 1, so base + delta == ft there; beyond that it may fail, and float64 catches the rest."""
    g = torch.Generator().manual_seed(5)
    n = 100_000
    for ck, wide, gap in ((torch.float32, torch.float64, 28), (torch.bfloat16, torch.float32, 15), (torch.float16, torch.float32, 12)):
        scale = torch.exp2(torch.randint(-8, 3, (n,), generator=g).double())
        b = (torch.randn(n, generator=g, dtype=torch.float64) * scale).to(ck)
        f = (b.double() * torch.exp2(torch.randint(-20, 8, (n,), generator=g).double()) * (torch.rand(n, generator=g) - 0.5).sign()
             + torch.randn(n, generator=g, dtype=torch.float64) * scale * 1e-3).to(ck)
        keep = (b != 0) & (f != 0) & torch.isfinite(f)
        b, f = b[keep], f[keep]
        _, off_narrow, _, _ = _fit_delta(b, f, ck, 0.0)
        assert off_narrow > 0.01 * len(b)
        delta, _, _, _ = _fit_delta(b, f, wide, 0.0)
        assert delta.dtype == wide
        exact = (b.to(wide) + delta).to(ck) == f
        close = (torch.frexp(b.double()).exponent - torch.frexp(f.double()).exponent).abs() <= gap
        assert bool(exact[close].all())
        delta64, off64, _, _ = _fit_delta(b, f, torch.float64, 0.0)
        assert off64 == 0 and torch.equal((b.double() + delta64).to(ck), f)
        # a tolerance of an ulp of the largest value is met in the checkpoint's own dtype
        ulp = float(torch.maximum(b.double().abs(), f.double().abs()).max() * 2 * torch.finfo(ck).eps)
        _, off_tol, _, err = _fit_delta(b, f, ck, ulp)
        assert off_tol == 0 and err > 0


# ---------- the file format ----------

def _good_files(tmp_path) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    deltas = {
        (0, "v_proj"): S2FTModuleDelta("row", torch.tensor([1, 7]), torch.randn(2, 64, generator=g)),
        (1, "down_proj"): S2FTModuleDelta("col", torch.tensor([0, 5, 127]), torch.randn(64, 3, generator=g)),
    }
    save_s2ft_adapter(tmp_path / "good", deltas, "tiny-llama")
    return {n: (tmp_path / "good" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def _cfg(**changes):
    def edit(files):
        cfg = json.loads(files["adapter_config.json"])
        cfg.update(changes)
        files["adapter_config.json"] = json.dumps(cfg).encode()
    return edit


def _raw(value: bytes):
    def edit(files):
        files["adapter_config.json"] = value
    return edit


def _tensors(fn):
    def edit(files):
        t = dict(st_load(files["adapter_model.safetensors"]))
        fn(t)
        files["adapter_model.safetensors"] = save(t)
    return edit


V, D = "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"


def _rename(old, new):
    return lambda t: t.__setitem__(new, t.pop(old))


MALFORMED = {
    "bad json": (_raw(b"{not json"), r"adapter_config\.json is not valid JSON"),
    "not an object": (_raw(b"[1, 2]"), r"must hold a JSON object"),
    "wrong peft_type": (_cfg(peft_type="LORA"), r"peft_type 'LORA' is not an S2FT adapter"),
    "wrong family": (_cfg(hotswap_family="lora"), r"hotswap_family 'lora' is not 's2ft'"),
    "wrong version": (_cfg(format_version=2), r"format_version 2 is not supported"),
    "bad target_modules": (_cfg(target_modules="v_proj"), r"target_modules must be a list"),
    "target_modules mismatch": (_cfg(target_modules=["v_proj"]), r"target_modules \['v_proj'\] does not match.*down_proj"),
    "missing weights": (lambda f: f.pop("adapter_model.safetensors"), r"needs adapter_config\.json and adapter_model\.safetensors"),
    "missing config": (lambda f: f.pop("adapter_config.json"), r"adapter_config\.json missing"),
    "unreadable safetensors": (lambda f: f.__setitem__("adapter_model.safetensors", b"garbage!"), r"not a readable safetensors file"),
    "empty": (_tensors(lambda t: t.clear()), r"holds no S2FT deltas"),
    "unknown module": (_tensors(lambda t: (_rename(f"{V}.s2_row_indices", "model.layers.0.self_attn.x_proj.s2_row_indices")(t),
                                           _rename(f"{V}.s2_row_delta", "model.layers.0.self_attn.x_proj.s2_row_delta")(t))),
                       r"module 'x_proj' is not supported"),
    "module under wrong parent": (_tensors(lambda t: (_rename(f"{V}.s2_row_indices", "model.layers.0.mlp.v_proj.s2_row_indices")(t),
                                                      _rename(f"{V}.s2_row_delta", "model.layers.0.mlp.v_proj.s2_row_delta")(t))),
                                  r"v_proj belongs under self_attn, not mlp"),
    "unexpected key": (_tensors(lambda t: t.__setitem__(f"{V}.weight", torch.zeros(2))), r"unexpected tensor 'model\.layers\.0\.self_attn\.v_proj\.weight'"),
    "lm_head key": (_tensors(lambda t: t.__setitem__("lm_head.s2_row_delta", torch.zeros(2))), r"unexpected tensor 'lm_head"),
    "leading zero layer": (_tensors(_rename(f"{V}.s2_row_delta", "model.layers.00.self_attn.v_proj.s2_row_delta")), r"unexpected tensor"),
    "layer out of range": (_tensors(lambda t: (_rename(f"{D}.s2_col_indices", "model.layers.2.mlp.down_proj.s2_col_indices")(t),
                                               _rename(f"{D}.s2_col_delta", "model.layers.2.mlp.down_proj.s2_col_delta")(t))),
                           r"addresses layer 2 but the base model has 2 layers"),
    "indices int64": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", t[f"{V}.s2_row_indices"].long())), r"s2_row_indices must be int32, got torch\.int64"),
    "indices float": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", t[f"{V}.s2_row_indices"].float())), r"must be int32, got torch\.float32"),
    "indices 2-D": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", t[f"{V}.s2_row_indices"].view(1, 2))), r"non-empty 1-D tensor, got shape \(1, 2\)"),
    "indices empty": (_tensors(lambda t: (t.__setitem__(f"{V}.s2_row_indices", torch.zeros(0, dtype=torch.int32)),
                                          t.__setitem__(f"{V}.s2_row_delta", torch.zeros(0, 64)))), r"non-empty 1-D tensor, got shape \(0,\)"),
    "row index out of range": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", torch.tensor([1, 32], dtype=torch.int32))), r"out of range: the module has 32 output rows"),
    "col index out of range": (_tensors(lambda t: t.__setitem__(f"{D}.s2_col_indices", torch.tensor([0, 5, 128], dtype=torch.int32))), r"out of range: the module has 128 input columns"),
    "negative index": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", torch.tensor([-1, 3], dtype=torch.int32))), r"out of range"),
    "duplicate indices": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", torch.tensor([7, 7], dtype=torch.int32))), r"sorted and unique"),
    "unsorted indices": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_indices", torch.tensor([7, 1], dtype=torch.int32))), r"sorted and unique"),
    "row delta d_in mismatch": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_delta", torch.zeros(2, 65))), r"s2_row_delta has shape \(2, 65\).*needs \(2, 64\)"),
    "row delta k mismatch": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_delta", torch.zeros(3, 64))), r"s2_row_delta has shape \(3, 64\).*k=2.*needs \(2, 64\)"),
    "col delta d_out mismatch": (_tensors(lambda t: t.__setitem__(f"{D}.s2_col_delta", torch.zeros(128, 3))), r"s2_col_delta has shape \(128, 3\).*needs \(64, 3\)"),
    "col delta k mismatch": (_tensors(lambda t: t.__setitem__(f"{D}.s2_col_delta", torch.zeros(64, 2))), r"needs \(64, 3\)"),
    "delta 1-D": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_delta", torch.zeros(128))), r"s2_row_delta has shape \(128,\)"),
    "row and col": (_tensors(lambda t: (t.__setitem__(f"{V}.s2_col_indices", torch.tensor([0], dtype=torch.int32)),
                                        t.__setitem__(f"{V}.s2_col_delta", torch.zeros(32, 1)))), r"both a row and a column delta"),
    "integer delta": (_tensors(lambda t: t.__setitem__(f"{V}.s2_row_delta", torch.zeros(2, 64, dtype=torch.int32))), r"s2_row_delta must be floating point, got torch\.int32"),
    "non-finite delta": (_tensors(lambda t: t[f"{V}.s2_row_delta"].__setitem__((0, 0), float("inf"))), r"non-finite"),
    "indices without delta": (_tensors(lambda t: t.pop(f"{V}.s2_row_delta")), r"layer 0 v_proj has s2_row_indices but not its pair s2_row_delta"),
    "delta without indices": (_tensors(lambda t: t.pop(f"{D}.s2_col_indices")), r"layer 1 down_proj has s2_col_delta but not its pair s2_col_indices"),
}


def test_good_files_parse(tmp_path):
    out = parse_s2ft_files(_good_files(tmp_path), "a", dims, NUM_LAYERS)
    assert out[(0, "v_proj")].kind == "row" and out[(0, "v_proj")].indices.tolist() == [1, 7]
    assert out[(1, "down_proj")].kind == "col" and out[(1, "down_proj")].delta.shape == (64, 3)
    dense = dense_delta(out[(1, "down_proj")], 64, 128)
    assert torch.equal(dense[:, [0, 5, 127]], out[(1, "down_proj")].delta) and dense[:, 1:5].abs().sum() == 0


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_parse_rejects(tmp_path, case):
    edit, match = MALFORMED[case]
    files = _good_files(tmp_path)
    edit(files)
    with pytest.raises(AdapterError, match=match) as e:
        parse_s2ft_files(files, "bad-adapter", dims, NUM_LAYERS)
    assert str(e.value).startswith("bad-adapter: ")


def test_load_s2ft_adapter_missing_file(tmp_path):
    _good_files(tmp_path)
    (tmp_path / "good" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        load_s2ft_adapter(tmp_path / "good", "a", dims, NUM_LAYERS)


def test_save_refuses_bad_deltas(tmp_path):
    with pytest.raises(ValueError, match="sorted and unique"):
        save_s2ft_adapter(tmp_path, {(0, "v_proj"): S2FTModuleDelta("row", torch.tensor([3, 1]), torch.zeros(2, 64))}, "m")
    with pytest.raises(ValueError, match="does not fit k=2"):
        save_s2ft_adapter(tmp_path, {(0, "v_proj"): S2FTModuleDelta("col", torch.tensor([1, 3]), torch.zeros(2, 64))}, "m")
    with pytest.raises(ValueError, match="unknown S2FT module"):
        s2ft_key(0, "lm_head")


def test_verification_catches_a_wrong_adapter(ckpts, tmp_path, monkeypatch):
    """The verification re-reads the files: a wrong delta entry, or a float64 delta rounded to float32,
    makes the conversion fail instead of passing silently."""
    import server.families.s2ft_convert as conv

    real_save = conv.save_s2ft_adapter

    def save_narrowed(out_dir, deltas, base_model):
        real_save(out_dir, {k: S2FTModuleDelta(d.kind, d.indices, d.delta.float()) for k, d in deltas.items()}, base_model)

    def save_wrong_entry(out_dir, deltas, base_model):
        d = deltas[(1, "o_proj")]
        bad = d.delta.clone()
        bad[0, 0] += 1e-3
        real_save(out_dir, {**deltas, (1, "o_proj"): S2FTModuleDelta(d.kind, d.indices, bad)}, base_model)

    for fake, where in ((save_narrowed, "up_proj"), (save_wrong_entry, "o_proj")):
        monkeypatch.setattr(conv, "save_s2ft_adapter", fake)
        with pytest.raises(ConvertError, match=rf"verification failed: .*{where}\.weight: base \+ delta differs"):
            convert_s2ft(ckpts / "base", ckpts / "ft", tmp_path / fake.__name__, progress=False)


def test_forced_delta_dtype(ckpts, tmp_path):
    with pytest.raises(ConvertError, match=r"layer 0 up_proj: \d+ changed entries cannot be reproduced exactly .* in float32 "
                                           r"\(e\.g\. base 1\.0 -> fine-tuned 0\.250000029802322.*leave --delta-dtype at auto"):
        convert_s2ft(ckpts / "base", ckpts / "ft", tmp_path / "a", delta_dtype=torch.float32, progress=False)
    report = convert_s2ft(ckpts / "base", ckpts / "ft", tmp_path / "b", delta_dtype=torch.float64, progress=False)
    assert {m.dtype for m in report.modules} == {"float64"}


def test_bfloat16_checkpoints_are_exact(ckpts, tmp_path):
    """bfloat16 checkpoints: ft - base in bfloat16 is often not enough; float32 deltas make them exact."""
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        sd = load_file(ckpts / name / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path / name / "model.safetensors")
    report = convert_s2ft(tmp_path / "base", tmp_path / "ft", tmp_path / "a", progress=False)
    assert set(report.kinds) == set(CHANGES)
    assert {m.checkpoint_dtype for m in report.modules} == {"bfloat16"}
    assert "float32" in {m.dtype for m in report.modules}
    deltas = load_s2ft_adapter(tmp_path / "a", "a", dims, NUM_LAYERS)
    base, ft = load_file(tmp_path / "base" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    for (layer, module), d in deltas.items():
        assert torch.equal(apply_s2ft_delta(base[wkey(layer, module)], d), ft[wkey(layer, module)])
