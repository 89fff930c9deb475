"""int8 on CUDA without torch's naive `_weight_int8pack_mm` kernel: the choice of product per
device, and the buffered and compiled products checked on the CPU (no GPU here; bench/gpu_check.py
compares their tokens on one)."""
import gc

import pytest
import torch

from nextstep_core.weights import int8_gpu
from nextstep_core.weights.int8_gpu import INT8_MATMUL_ENV, Scratch, buffered_linear, choose_path, gpu_linear, scratch_for
from nextstep_core.weights.quant import Int8Linear, dequantized_linear, int8_matmul_available, quantize_weight


def test_cuda_never_takes_the_weight_only_kernel_and_the_cpu_keeps_it():
    assert choose_path("cuda", 512, triton=True, int8pack=True) == "compiled"
    assert choose_path("cuda", 512, triton=False, int8pack=True) == "buffer"
    assert choose_path("cuda", 512, triton=True, int8pack=True, mode="buffer") == "buffer"
    assert choose_path("cuda", 512, triton=True, int8pack=True, mode="off") == "dequantize"
    assert choose_path("cpu", 512, triton=False, int8pack=True) == "int8pack"
    assert choose_path("cpu", 48, triton=False, int8pack=True) == "dequantize"  # the CPU kernel needs K % 32 here
    assert choose_path("cpu", 512, triton=False, int8pack=False) == "dequantize"
    assert choose_path("meta", 512, triton=True, int8pack=True) == "dequantize"
    assert not int8_matmul_available(torch.device("cuda", 0))  # never probed, never used on CUDA


def test_a_cpu_layer_keeps_torchs_kernel(monkeypatch):
    lin = torch.nn.Linear(64, 32)
    q = Int8Linear.from_linear(lin)
    assert q.path == ("int8pack" if int8_matmul_available(torch.device("cpu")) else "dequantize")
    assert q.scratch is None
    monkeypatch.setenv(INT8_MATMUL_ENV, "off")
    assert Int8Linear.from_linear(lin).path == "dequantize"


def weights(out=96, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_weight(torch.randn(out, inp, generator=g), "int8")
    return q, scale, torch.randn(out, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_buffered_product_is_the_dequantized_one(dtype):
    q, scale, bias = weights()
    x = torch.randn(3, 5, 64).to(dtype)
    scratch = Scratch()
    got = buffered_linear(x, q, scale, bias.to(dtype), scratch)
    assert torch.equal(got, dequantized_linear(x, q, scale, bias.to(dtype)))  # the same operations on the same values
    assert got.dtype == dtype


def test_one_scratch_buffer_per_device_shared_grown_and_freed_with_its_last_layer():
    small, big = weights(32, 64), weights(128, 64, seed=1)
    scratch = Scratch()
    x = torch.randn(2, 64)
    buffered_linear(x, small[0], small[1], None, scratch)
    first = scratch.buffers[torch.float32]
    buffered_linear(x, big[0], big[1], None, scratch)
    grown = scratch.buffers[torch.float32]
    assert grown.numel() == 128 * 64 and first.numel() == 32 * 64
    buffered_linear(x, small[0], small[1], None, scratch)
    assert scratch.buffers[torch.float32] is grown  # reused, not reallocated
    # the registry holds scratch buffers weakly: they go with the last layer that holds them
    device = torch.device("meta")
    held = scratch_for(device)
    assert scratch_for(device) is held
    del held
    gc.collect()
    assert str(device) not in int8_gpu._SCRATCH


def test_a_failing_compile_falls_back_to_the_buffer_with_a_warning(monkeypatch):
    q, scale, bias = weights()
    layer = Int8Linear(q, scale, bias)
    layer.path, layer.scratch = "compiled", Scratch()  # as on a CUDA GPU with Triton

    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(int8_gpu, "_compiled", broken)
    int8_gpu._SEEN.clear()
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match="compiling the int8 product failed"):
        y = gpu_linear(layer, x, q, scale, bias)
    assert layer.path == "buffer"
    assert torch.equal(y, dequantized_linear(x, q, scale, bias))
    long = torch.randn(40, 64)  # more rows than a decode step: the buffer, never the compiler
    layer.path = "compiled"
    assert torch.equal(gpu_linear(layer, long, q, scale, bias), dequantized_linear(long, q, scale, bias))
    assert layer.path == "compiled"
