"""Quantized backbone weights (int8, fp8, int4): the linears, load-time quantization, pre-quantized files, the CLI.

Quality is measured teacher-forced (each token sampled from the state after the reference's
previous tokens, with the reference's noise) because a free-running comparison on random weights
measures chaos. The bounds are a few times the measured error and well below what a scale off by
10% gives, so a broken quantizer fails them.
"""
import copy
import json
import os
import shutil

import pytest
import torch

from nextstep_core.checkpoint import load_backbone, load_flow_head, load_vae, model_variant
from nextstep_core.cli import main as cli_main
from nextstep_core.engine import SamplingSettings
from nextstep_core.errors import CheckpointError, SettingsError
from nextstep_core.weights.int4 import INT4_MATMUL_ENV, Int4Linear
from nextstep_core.pipeline import NextStepPipeline, Request
from nextstep_core.weights.convention import quantize_backbone
from nextstep_core.weights.quant import (FP8_MATMUL_ENV, LINEARS, Fp8Linear, Int8Linear, QuantLinear, format_of,
                                 probe_fp8_matmul)
from nextstep_core.weights.quant_write import save_quantized
from bench.token_error import relative_error, teacher_forced
from parity_support import assert_tokens_close

REAL = SamplingSettings(cfg=7.5, steps=28)
QUICK = SamplingSettings(steps=3)
# teacher-forced mean relative error of (image tokens, final hidden states) vs float32 on the tiny model,
# 48x48, cfg 7.5, 28 steps; measured: int8 0.0058 / 0.0025, fp8 (one scale per matrix) 0.050 / 0.019; every
# scale x1.1: 0.19-0.21 / 0.078-0.086
BOUNDS = {"int8": (0.025, 0.01), "fp8": (0.09, 0.035), "int4": (0.17, 0.06)}
# int4 (group-wise, CPU kernel, bf16 activations into it): measured 0.122 / 0.043; every scale x1.1: 0.25 / 0.098
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def random_linear(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(512, 256, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 512, generator=g) / 512 ** 0.5)
        lin.weight[3] = 0  # an all-zero row must stay exactly zero
    return lin, torch.randn(2, 5, 512, generator=g)


@pytest.mark.parametrize("cls,bound", [(Int8Linear, 0.01), (Fp8Linear, 0.035)])
def test_8bit_linear_against_float32(cls, bound):
    lin, x = random_linear()
    q = cls.from_linear(lin)
    assert q.weight.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[q.fmt]
    assert q.scale.dtype == torch.float32 and q.scale.shape == (256,)
    assert set(q.state_dict()) == {"weight", "bias", "scale"}
    assert {n for n, _ in q.named_parameters()} == {"weight", "bias", "scale"}  # layer streaming moves parameters
    assert not q.weight[3].float().any()
    err = relative_error(q(x), lin(x))
    assert err.max() < bound, err.max()  # measured: int8 0.0079, fp8 0.030
    # the same product in bf16 keeps the error (the float32 scale adds no rounding of its own)
    q16 = copy.deepcopy(q).to(torch.bfloat16)
    assert q16.weight.dtype == q.weight.dtype and q16.scale.dtype == torch.float32 and q16.bias.dtype == torch.bfloat16
    assert relative_error(q16(x.bfloat16()), lin(x)).max() < bound + 0.01


def test_fp8_scaled_mm_path_pads_rows_and_passes_the_layouts_scaled_mm_needs(monkeypatch):
    """The CUDA path runs here on the CPU kernel: rows padded to 16, row-major activations,
    column-major weight, 2-D float32 scales, bf16 out; checked at the call and against dequant."""
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError):
        pytest.skip("this PyTorch has no row-wise fp8 matmul on the CPU")
    monkeypatch.setenv(FP8_MATMUL_ENV, "on")
    lin, x = random_linear()
    q = Fp8Linear.from_linear(lin)
    assert q.scaled_mm
    real, calls = torch._scaled_mm, []

    def checked(a, b, scale_a, scale_b, out_dtype=None, **kw):
        calls.append(tuple(a.shape))
        assert a.dtype == b.dtype == torch.float8_e4m3fn and a.shape[0] % 16 == 0 and a.is_contiguous()
        assert b.shape == (512, 256) and b.stride() == (1, 512)  # column-major
        assert scale_a.shape == (a.shape[0], 1) and scale_b.shape == (1, 256)
        assert scale_a.dtype == scale_b.dtype == torch.float32 and out_dtype == torch.bfloat16
        return real(a, b, scale_a, scale_b, out_dtype=out_dtype, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    xb = x.bfloat16()
    y = q(xb)
    assert calls == [(16, 512)] and y.shape == (2, 5, 256) and y.dtype == torch.bfloat16
    assert relative_error(y, lin(x)).max() < 0.06  # weights and activations in fp8
    assert relative_error(y, q.dequantized(xb)).max() < 0.05
    assert q(x).dtype == torch.float32 and len(calls) == 1  # float32 activations take the dequantized path
    monkeypatch.setenv(FP8_MATMUL_ENV, "off")
    assert not Fp8Linear.from_linear(lin).scaled_mm
    # the once-per-GPU probe, run here on the CPU kernel: it passes, and refuses a kernel that errs
    monkeypatch.setattr(torch, "_scaled_mm", real)
    assert probe_fp8_matmul(torch.device("cpu"))
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, scale_a, scale_b, **kw: real(a, b, scale_a, 2 * scale_b,
                                                                                         **kw))
    with pytest.warns(UserWarning, match="relative error"):
        assert not probe_fp8_matmul(torch.device("cpu"))


def test_quantize_backbone_keeps_the_module_tree_and_names(tiny_model):
    bb, _ = load_backbone(tiny_model)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    quantize_backbone(bb, "int8")
    after = bb.state_dict()
    scales = {f"layers.{i}.{p}.scale" for i in range(len(bb.layers)) for p in LINEARS}
    assert set(after) == set(before) | scales
    assert format_of(bb) == "int8" and isinstance(bb.layers[1].mlp.down_proj, Int8Linear)
    for name in ("embed_tokens.weight", "norm.weight", "image_in_projector.weight", "image_out_projector.bias",
                 "layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.bias"):
        assert torch.equal(after[name], before[name]), name
    assert not any(isinstance(m, QuantLinear) for m in (bb.image_in_projector, bb.image_out_projector))
    with pytest.raises(SettingsError, match="already quantized"):
        quantize_backbone(bb, "fp8")
    with pytest.raises(SettingsError, match="Unknown weight format 'int3'"):
        quantize_backbone(bb, "int3")


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_pipeline):
    """A float32 run with the model card's settings, then its teacher-forced re-sampling."""
    p = tiny_pipeline
    req = Request(["a red cube on a table"], 48, 48, seed=3, sampling=REAL)
    run = tokens_only(NextStepPipeline(p.backbone, p.tokenizer, p.head, p.vae)).run(req)
    tokens, hidden = teacher_forced(tiny_pipeline.backbone, tiny_pipeline.head, run.rows, run.tokens, REAL, seed=3)
    assert relative_error(tokens, run.tokens).max() < 1e-4  # the reference reproduces its own run
    return run, tokens, hidden


def token_error(bb, pipe, reference):
    run, tokens, hidden = reference
    t, h = teacher_forced(bb, pipe.head, run.rows, run.tokens, REAL, seed=3)
    return float(relative_error(t, tokens).mean()), float(relative_error(h, hidden).mean())


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_teacher_forced_token_error_is_bounded_and_a_wrong_scale_breaks_the_bound(fmt, tiny_pipeline, reference):
    tok_bound, hidden_bound = BOUNDS[fmt]
    q = quantize_backbone(copy.deepcopy(tiny_pipeline.backbone), fmt)
    tok_err, hidden_err = token_error(q, tiny_pipeline, reference)
    assert tok_err < tok_bound and hidden_err < hidden_bound, (tok_err, hidden_err)
    for factor in (2.0, 1.1):
        broken = copy.deepcopy(q)
        for m in broken.modules():
            if isinstance(m, (QuantLinear, Int4Linear)):
                m.scale *= factor  # int4: scale and zero together, i.e. the weight
        tok_err, hidden_err = token_error(broken, tiny_pipeline, reference)
        assert tok_err > tok_bound and hidden_err > hidden_bound, (factor, tok_err, hidden_err)


def tokens_only(pipe):
    """The pipeline without the VAE decode (most of a tiny run's time; tokens are what is compared)."""
    pipe.decode = lambda tokens, grid: tokens
    return pipe


def first_tokens(bb, tok, folder, seed=4):
    pipe = tokens_only(NextStepPipeline(bb, tok, load_flow_head(folder), load_vae(folder)))
    return pipe.run(Request(["a blue vase"], 32, 48, seed=seed, sampling=QUICK)).tokens


def test_load_time_quantization_matches_quantizing_a_loaded_model(tiny_model):
    loaded, tok = load_backbone(tiny_model, quant="fp8")
    full, _ = load_backbone(tiny_model)
    direct = quantize_backbone(full, "fp8")
    a, b = loaded.state_dict(), direct.state_dict()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)
    assert loaded.layers[0].self_attn.q_proj.bias.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_a_prequantized_file_gives_the_tokens_of_load_time_quantization(fmt, tiny_model, tmp_path, monkeypatch):
    # int4's kernels round activations to bf16, a step function: the file's other byte alignment moves
    # an ordinary Linear by ~6e-7, which can flip one rounding and then compounds over the tokens.
    # The same int4 numbers are checked exactly below; the tokens through the continuous dequantized path.
    monkeypatch.setenv(INT4_MATMUL_ENV, "off")
    # what a user downloads: the file, the tokenizer files and vae/ (no config.json, no full weights)
    folder = tmp_path / "NextStep-1-Large-Edit-8bit"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tiny_model, name), folder)
    shutil.copytree(os.path.join(tiny_model, "vae"), folder / "vae")
    loaded, tok = load_backbone(tiny_model, quant=fmt)
    out = save_quantized(loaded, tiny_model, str(folder / f"tiny-{fmt}.safetensors"))
    want = first_tokens(loaded, tok, tiny_model)
    for path in (out, str(folder)):
        again, tok2 = load_backbone(path, with_lm_head=True)
        assert format_of(again) == fmt and again.source == out and again.lm_head is not None
        sa, sb = loaded.state_dict(), again.state_dict()
        assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)  # the same 8-bit numbers and scales
        assert_tokens_close(first_tokens(again, tok2, path), want)  # other memory layout: last bits only
    assert model_variant(out) == "nextstep1-large"  # recorded from the source folder's name
    assert model_variant(str(folder)) == "nextstep1-large-edit"  # a folder's own name still decides first


def test_streamed_layers_carry_their_scales(tiny_model):
    from nextstep_core.weights.streaming import stream_layers
    bb, tok = load_backbone(tiny_model, quant="int8")
    want = first_tokens(bb, tok, tiny_model)
    streamer = stream_layers(bb, gpu_layers=1)
    try:
        assert_tokens_close(first_tokens(bb, tok, tiny_model), want)
    finally:
        streamer.remove()


def test_a_folder_with_full_weights_and_a_prequantized_file(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    loaded, _ = load_backbone(str(folder), quant="fp8")
    path = save_quantized(loaded, str(folder), str(folder / "fp8.safetensors"), lm_head=False)
    assert format_of(load_backbone(str(folder))[0]) is None  # no format asked: the full weights
    chosen, _ = load_backbone(str(folder), quant="fp8")
    assert chosen.source == path
    other, _ = load_backbone(str(folder), quant="int8")  # quantized from the full weights
    assert format_of(other) == "int8" and other.source == str(folder)
    with pytest.raises(SettingsError, match="holds fp8 weights but int8 was asked"):
        load_backbone(path, quant="int8")
    with pytest.raises(CheckpointError, match="made without the LM head"):
        load_backbone(path, with_lm_head=True)


def test_bad_inputs_are_named(tiny_model, tmp_path):
    with pytest.raises(SettingsError, match="Unknown weight format 'int3'"):
        load_backbone(tiny_model, quant="int3")
    with pytest.raises(CheckpointError, match="not a pre-quantized NextStep file.*quantize"):
        load_backbone(os.path.join(tiny_model, "model.safetensors"))
    full, _ = load_backbone(tiny_model)
    with pytest.raises(SettingsError, match="not quantized"):
        save_quantized(full, tiny_model, str(tmp_path / "x.safetensors"))
    q, _ = load_backbone(tiny_model, quant="int8")
    path = save_quantized(q, tiny_model, str(tmp_path / "q.safetensors"))
    with pytest.raises(SettingsError, match="already exists"):
        save_quantized(q, tiny_model, path)
    # next to another model's config.json
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (other / "config.json").write_text(json.dumps(cfg))
    shutil.copy(path, other / "q.safetensors")
    with pytest.raises(CheckpointError, match=r"q.safetensors was made from a model with intermediate_size=128.*"
                                              r"another NextStep model"):
        load_backbone(str(other / "q.safetensors"))
    # without the tokenizer files beside it
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path, alone / "q.safetensors")
    with pytest.raises(CheckpointError, match="tokenizer is read from the folder it lies in.*No tokenizer.json"):
        load_backbone(str(alone / "q.safetensors"))


def test_cli_quantize_then_generate_from_the_file_and_with_quant(tiny_model, tmp_path, capsys):
    out = tmp_path / "tiny-int8.safetensors"
    assert cli_main(["quantize", "--model", tiny_model, "--format", "int8", "--out", str(out)]) == 0
    assert "int8" in capsys.readouterr().err
    before = out.read_bytes()
    assert cli_main(["quantize", "--model", tiny_model, "--format", "fp8", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".nextstep-")]
    with pytest.raises(SystemExit):
        cli_main(["quantize", "--model", tiny_model, "--format", "int3", "--out", str(out)])
    capsys.readouterr()
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    shutil.move(out, folder / out.name)
    runs = {}
    for name, model, extra in [("load-time", tiny_model, ["--quant", "int8"]),
                               ("file", str(folder / out.name), []),
                               ("folder", str(folder), ["--quant", "int8"])]:
        toks = tmp_path / f"{name}.safetensors"
        assert cli_main(["generate", "--model", model, "--prompt", "x", "--width", "32", "--height", "32", "--seed",
                         "2", "--steps", "3", "--quiet", "--out", str(tmp_path / f"{name}.png"),
                         "--tokens-out", str(toks), *extra]) == 0, capsys.readouterr().err
        from safetensors.torch import load_file
        runs[name] = load_file(toks)["tokens"]
    assert_tokens_close(runs["file"], runs["load-time"])
    assert_tokens_close(runs["folder"], runs["file"])
