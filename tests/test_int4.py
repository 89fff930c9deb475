"""int4 weights: packing, the kernel layouts, the CPU kernel against the dequantized reference,
moving and saving, streaming, the CLI."""
import copy

import pytest
import torch
import torch.nn.functional as F

from nextstep_core.checkpoint import load_backbone
from nextstep_core.cli import main as cli_main
from nextstep_core.weights.int4 import (INT4_MATMUL_ENV, Int4Linear, _from_kernel, _to_kernel, _unpack_cpu, dequantize,
                                group_size, quantize_int4, unpack)
from nextstep_core.weights.quant import format_of
from parity_support import assert_tokens_close
from test_quant import first_tokens

KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def weights(out_f=256, in_f=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    w[5] = 0  # an all-zero row stays exactly zero
    w[6, :128] = 0.25  # a constant group is exact up to bf16
    return w, torch.randn(2, 7, in_f, generator=g)


def test_pack_unpack_round_trip_and_quantization_error():
    w, _ = weights()
    packed, sz = quantize_int4(w, 128)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 256) and sz.shape == (4, 256, 2)
    q = unpack(packed)
    assert int(q.max()) <= 15
    repacked = (q[:, 0::2] << 4) | q[:, 1::2]
    assert torch.equal(repacked, packed)
    dq = dequantize(packed, sz)
    scale = sz[..., 0].t().float().repeat_interleave(128, dim=1)
    # rounding to the nearest of 16 levels: at most half a step (measured 0.49999 of the step)
    assert ((w - dq).abs() / scale).max() <= 0.5 + 1e-3
    assert not dq[5].any()
    torch.testing.assert_close(dq[6, :128], torch.full((128,), 0.25), atol=0, rtol=0)


@pytest.mark.skipif(not KERNEL, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("tiles", [2, 4, 8])
@pytest.mark.parametrize("rows", [256, 96])  # whole blocks of 64 rows, and a shorter last block
def test_the_cpu_kernel_layout_unpacks_exactly(tiles, rows):
    w, _ = weights(rows)
    packed, _ = quantize_int4(w, 128)
    tiled = _to_kernel(packed, "cpu", tiles)
    assert not torch.equal(tiled, packed)  # it is another layout
    assert torch.equal(_unpack_cpu(tiled, 512, tiles), packed)  # by the permutation
    assert torch.equal(_from_kernel(tiled, "cpu", 512, rows, 128), packed)  # by the kernel on an identity


@pytest.mark.skipif(not KERNEL, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("shape", [(256, 512), (64, 128), (96, 64)])
def test_kernel_matches_the_dequantized_reference(shape):
    w, x = weights(*shape)
    lin = torch.nn.Linear(shape[1], shape[0])
    lin.weight.data = w
    q = Int4Linear.from_linear(lin)
    q(x)  # the CPU layout is made before the first use
    assert q.kernel == "cpu" and q.group == group_size(shape[1])
    ref = F.linear(x.bfloat16().float(), dequantize(q.stored_weight(), q.scale)) + lin.bias
    # the kernel returns bf16 (one rounding of the output): measured max |diff| 0.0078 at |y| <= 4.2
    torch.testing.assert_close(q(x), ref, rtol=2 ** -7, atol=2e-3)
    # and the quantization itself stays in int4's range of error on these weights (measured 0.087-0.10)
    assert (q(x) - lin(x)).norm() / lin(x).norm() < 0.15


def test_fallback_dequantizes_and_matches_the_kernel(monkeypatch):
    w, x = weights()
    lin = torch.nn.Linear(512, 256)
    lin.weight.data = w
    fast = Int4Linear.from_linear(lin)
    want = fast(x)  # the kernel is chosen at the first use on a CPU
    assert fast.kernel == "cpu"
    monkeypatch.setenv(INT4_MATMUL_ENV, "off")
    slow = Int4Linear.from_linear(lin)
    assert slow.kernel is None
    torch.testing.assert_close(slow(x.bfloat16().float()), want, rtol=2 ** -7, atol=2e-3)  # as above
    assert slow.kernel is None


def test_state_dict_moves_and_dtype_casts_keep_the_stored_form():
    w, x = weights()
    lin = torch.nn.Linear(512, 256)
    lin.weight.data = w
    q = Int4Linear.from_linear(lin)
    packed, sz = quantize_int4(w, 128)
    sd = q.state_dict()
    assert torch.equal(sd["weight"], packed) and torch.equal(sd["scale"], sz)
    again = Int4Linear.empty(512, 256, True, device="meta")
    again.load_state_dict(sd, assign=True)
    assert torch.equal(again(x), q(x))  # the same computation
    half = copy.deepcopy(q).to(torch.bfloat16)
    assert half.weight.dtype == torch.uint8 and half.scale.dtype == torch.bfloat16
    assert half.bias.dtype == torch.bfloat16
    assert torch.equal(half.stored_weight(), packed)


def test_backbone_int4_state_and_streaming(tiny_model):
    bb, tok = load_backbone(tiny_model, quant="int4")
    assert format_of(bb) == "int4" and isinstance(bb.layers[0].mlp.up_proj, Int4Linear)
    assert bb.layers[0].mlp.up_proj.weight.dtype == torch.uint8
    want = first_tokens(bb, tok, tiny_model)
    from nextstep_core.weights.streaming import stream_layers
    streamer = stream_layers(bb, gpu_layers=0)  # nothing resident: what ComfyUI's --novram gets
    try:
        assert streamer.plan.resident == 0 and streamer.plan.streamed == len(bb.layers)
        assert_tokens_close(first_tokens(bb, tok, tiny_model), want)
    finally:
        streamer.remove()


def test_cli_quantize_int4_then_generate(tiny_model, tmp_path, capsys):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    out = folder / "tiny-int4.safetensors"
    assert cli_main(["quantize", "--model", str(folder), "--format", "int4", "--out", str(out)]) == 0
    assert "int4" in capsys.readouterr().err
    from nextstep_core.weights.quant_file import file_format
    assert file_format(str(out)) == "int4"
    bb, _ = load_backbone(str(out))
    assert format_of(bb) == "int4"
    assert cli_main(["generate", "--model", str(out), "--prompt", "x", "--width", "32", "--height", "32",
                     "--steps", "2", "--gpu-layers", "auto", "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "low-VRAM mode: 2/2 layers on the GPU, nothing streamed" in err, err
    assert (tmp_path / "a.png").is_file()
