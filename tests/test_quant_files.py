"""Pre-quantized files in ComfyUI's convention: the header and names ComfyUI 0.33 reads, the pack's
earlier files still loading, and a file giving the tokens of quantizing at load on a model whose
rows hold several int4 groups.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextstep_core.checkpoint import load_backbone
from nextstep_core.cli import main as cli_main
from nextstep_core.tiny import write_tiny
from nextstep_core.weights.convention import declared_layers, layer_entry, to_core
from nextstep_core.weights.quant import LINEARS, format_of
from nextstep_core.weights.quant_file import file_format, is_earlier_layout, read_stored
from nextstep_core.weights.reading import ALIGN, WeightIndex
from parity_support import assert_tokens_close

CORE = {"int8": "int8_tensorwise", "fp8": "float8_e4m3fn", "int4": "nextstep_int4"}


@pytest.fixture(scope="module")
def grouped_model(tmp_path_factory):
    """Rows of 256 and 512 inputs: two and four 128-wide int4 groups (the tiny model's 64-wide rows
    hold less than one)."""
    return write_tiny(str(tmp_path_factory.mktemp("grouped") / "NextStep-1-Large"), hidden=256, layers=2, heads=4,
                      kv_heads=2, mlp=512)


@pytest.fixture(scope="module")
def files(grouped_model, tmp_path_factory):
    """fmt -> a file made by `quantize` from the grouped model, in a folder of its own with the
    tokenizer files and vae/ (what a user downloads)."""
    folder = tmp_path_factory.mktemp("files") / "NextStep-1-Large-q"
    folder.mkdir()
    for name in os.listdir(grouped_model):
        if name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(os.path.join(grouped_model, name), folder)
    shutil.copytree(os.path.join(grouped_model, "vae"), folder / "vae")
    out = {}
    for fmt in CORE:
        out[fmt] = str(folder / f"q-{fmt}.safetensors")
        assert cli_main(["quantize", "--model", grouped_model, "--format", fmt, "--out", out[fmt]]) == 0
    return out


def header(path):
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))


@pytest.mark.parametrize("fmt", list(CORE))
def test_quantize_writes_comfyuis_convention(fmt, files):
    h = header(files[fmt])
    meta = h["__metadata__"]
    quant = json.loads(meta["_quantization_metadata"])
    assert quant["format_version"] == "1.0"
    layers = {f"layers.{i}.{p}" for i in range(2) for p in LINEARS}
    assert set(quant["layers"]) == layers
    assert {e["format"] for e in quant["layers"].values()} == {CORE[fmt]}
    assert not [k for k in h if k.endswith(".scale")]  # the pack's earlier name is gone
    q = h["layers.1.mlp.down_proj.weight"]  # [256 out, 512 in]
    s = h["layers.1.mlp.down_proj.weight_scale"]
    if fmt == "int8":  # comfy-kitchen's TensorWiseINT8Layout: one scale per output channel, [out, 1]
        assert (q["dtype"], q["shape"], s["dtype"], s["shape"]) == ("I8", [256, 512], "F32", [256, 1])
    elif fmt == "fp8":  # one scale for the matrix
        assert (q["dtype"], q["shape"], s["dtype"], s["shape"]) == ("F8_E4M3", [256, 512], "F32", [])
    else:
        assert (q["dtype"], q["shape"], s["dtype"], s["shape"]) == ("U8", [256, 256], "BF16", [4, 256, 2])
        assert quant["layers"]["layers.1.mlp.down_proj"]["group_size"] == 128
    assert meta["nextstep_quant"] == fmt and file_format(files[fmt]) == fmt and not is_earlier_layout(files[fmt])
    # what ComfyUI 0.33 does with the header (comfy/utils.py convert_old_quants, detect_layer_quantization):
    # one `<layer>.comfy_quant` per declared layer, so its mixed-precision layers are chosen
    assert all(f"{name}.weight" in h and f"{name}.weight_scale" in h for name in declared_layers(meta))


def earlier_file(new_path: str, dest: str, fmt: str) -> str:
    """The same weights in the pack's earlier layout: `<layer>.scale` [out] (fp8: one per row, as
    that version quantized it), no `_quantization_metadata`."""
    state, h = load_file(new_path), header(new_path)
    meta = dict(h["__metadata__"])
    for layer in declared_layers(meta):
        scale = state.pop(f"{layer}.weight_scale")
        if fmt == "fp8":
            w = state[f"{layer}.weight"].float() * scale
            rows = (w.abs().amax(dim=1) / 448).clamp(min=1e-12)
            state[f"{layer}.weight"] = (w / rows[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            state[f"{layer}.scale"] = rows
        else:
            state[f"{layer}.scale"] = scale if fmt == "int4" else scale.reshape(-1)
    del meta["_quantization_metadata"]
    save_file(state, dest, metadata=meta)
    return dest


@pytest.mark.parametrize("fmt", list(CORE))
def test_earlier_files_load_with_a_note_and_can_be_written_again(fmt, files, tmp_path, capsys):
    old = earlier_file(files[fmt], os.path.join(os.path.dirname(files[fmt]), f"old-{fmt}.safetensors"), fmt)
    try:
        assert is_earlier_layout(old) and file_format(old) == fmt
        with pytest.warns(UserWarning, match="earlier .* layout; it is converted while loading"):
            bb, _ = load_backbone(old)
        assert format_of(bb) == fmt
        stored = load_file(old)
        lin = bb.layers[1].mlp.down_proj
        assert torch.equal(lin.weight if fmt != "int4" else lin.stored_weight(), stored["layers.1.mlp.down_proj.weight"])
        assert torch.equal(lin.scale, stored["layers.1.mlp.down_proj.scale"])  # fp8: its per-row scales, as they are
        new = str(tmp_path / f"again-{fmt}.safetensors")
        with pytest.warns(UserWarning, match="earlier"):
            assert cli_main(["quantize", "--model", old, "--out", new]) == 0
        err = capsys.readouterr().err
        assert f"{fmt}, rewritten from old-{fmt}.safetensors" in err
        assert ("requantized" in err) == (fmt == "fp8")
        assert not is_earlier_layout(new) and header(new)["layers.1.mlp.down_proj.weight_scale"]["shape"] == \
            header(files[fmt])["layers.1.mlp.down_proj.weight_scale"]["shape"]
        if fmt != "fp8":  # names and shapes only: the same numbers
            a, b = load_file(new), load_file(files[fmt])
            assert all(torch.equal(a[k], b[k]) for k in b if k.startswith("layers."))
        # what a host's layer gets from the earlier file (the nodes' path: read_stored, then to_core)
        held = to_core(fmt, read_stored(old, WeightIndex(old), "layers.1.mlp.down_proj", fmt, earlier=True))
        assert layer_entry(fmt, held)["format"] == CORE[fmt]
        assert held["weight_scale"].shape == load_file(new)["layers.1.mlp.down_proj.weight_scale"].shape
        other = "int8" if fmt == "fp8" else "fp8"
        assert cli_main(["quantize", "--model", old, "--format", other, "--out", str(tmp_path / "x.safetensors")]) == 2
        assert "can be written again only as" in capsys.readouterr().err
    finally:
        os.unlink(old)


def test_weights_read_from_files_sit_on_aligned_addresses(grouped_model, files):
    """The mechanism behind the next test: a tensor left inside its file's mapping sits wherever its
    offset puts it, and CPU matmuls round differently off a 64-byte boundary."""
    for source in (grouped_model, files["int8"]):
        bb, _ = load_backbone(source)
        off = [n for n, p in bb.named_parameters() if p.data_ptr() % ALIGN]
        assert not off, (source, off[:3])


@pytest.mark.parametrize("fmt", list(CORE))
def test_a_quantized_file_gives_the_tokens_of_quantizing_at_load(fmt, grouped_model, files, tmp_path, capsys):
    """Issue: int4 from a file drifted from int4 quantized at load from the second token on. Three
    routes, one code path: quantized at load, the file itself, and the file picked from a model
    folder because --quant names its format (the output line says which)."""
    folder = tmp_path / "NextStep-1-Large"
    shutil.copytree(grouped_model, folder)
    shutil.copy(files[fmt], folder / os.path.basename(files[fmt]))
    runs, lines = {}, {}
    for name, model, extra in [("load", grouped_model, ["--quant", fmt]), ("file", files[fmt], []),
                               ("folder", str(folder), ["--quant", fmt])]:
        toks = tmp_path / f"{name}.safetensors"
        assert cli_main(["generate", "--model", model, "--prompt", "a red cube", "--width", "64", "--height", "64",
                         "--seed", "2", "--steps", "3", "--out", str(tmp_path / f"{name}.png"), "--tokens-out",
                         str(toks), *extra]) == 0
        lines[name] = capsys.readouterr().err.strip().splitlines()[-1]
        runs[name] = load_file(str(toks))["tokens"]
    assert runs["load"].shape[1] == 16
    assert_tokens_close(runs["file"], runs["load"])
    assert_tokens_close(runs["folder"], runs["load"])
    assert f"{fmt} weights quantized while loading" in lines["load"]
    assert f"{fmt} weights from q-{fmt}.safetensors;" in lines["file"]
    assert f"{fmt} weights from q-{fmt}.safetensors in the model folder (not quantized at load)" in lines["folder"]
