"""The fast token step (fused projections, folded sampler, fused head blocks) against the
bit-parity path, its op counts, and the weight layout it relies on."""
import torch
from torch import nn

from bench.fast_vs_exact import lockstep
from bench.step_ops import build, eager_counts, make_step, step_counts
from nextstep_core.engine import Execution, SamplingSettings
from nextstep_core.fused import fused_linear


def _counts(layers=2, head_layers=2, steps=3, exact=False, quant=None, eager=False):
    bb, head = build(layers=layers, head_layers=head_layers, quant=quant)
    with torch.inference_mode():
        step = make_step(bb, head, SamplingSettings(steps=steps), Execution(exact=exact))
        return (eager_counts if eager else step_counts)(step)


def test_fast_step_op_counts_per_layer_and_per_head_step():
    """Ops (every aten call, views included) and kernels (views left out) that the captured step
    and the eager one (the CLI's default on a CPU) dispatch, from count differences so the fixed
    part cancels. Measured (torch 2.13, CPU), and used as the bounds, so one more op per layer or
    per step fails here; another torch that decomposes an op differently may need them measured
    again. Per decoder layer 14 kernels (2 rms_norm, q|k|v, RoPE 3, 2 cache writes, attention,
    o_proj + residual, gate|up, SiLU, multiply, down_proj + residual) and 22 ops captured, 26
    eager (its cache writes are a slice and a copy each, and it attends the filled prefix: two
    slices); per head block per step 6; per head step outside the blocks 6 with 2 CFG rows, no
    views (input projection, final LayerNorm, modulate, GEMM, then the folded sampler update: one
    multiply-add and one mixing product). The exact path keeps the reference's operations."""
    for eager, layer_ops in ((False, 22), (True, 26)):
        base = _counts(eager=eager)["whole"]
        layer = _counts(layers=3, eager=eager)["whole"]
        blocks = _counts(head_layers=3, eager=eager)["whole"]
        step = _counts(steps=4, eager=eager)["whole"]
        assert layer.kernels - base.kernels <= 14, (eager, layer.kernels - base.kernels)
        assert layer.total - base.total <= layer_ops, (eager, layer.total - base.total)
        per_block_step = (blocks.total - base.total) / 3
        assert per_block_step <= 6 and (blocks.kernels - base.kernels) / 3 <= 6, (eager, per_block_step)
        assert step.total - base.total - 2 * per_block_step <= 6, (eager, step.total - base.total)
        assert step.kernels - base.kernels == step.total - base.total  # a head step dispatches no views
    exact_layer = _counts(layers=3, exact=True)["whole"].kernels - _counts(exact=True)["whole"].kernels
    assert exact_layer > 14 + 10  # the parity path really is the unfused one


def test_8bit_fast_step_adds_no_kernels_per_layer():
    """int8 runs one weight-only kernel per product (no dequantized copy of the weight per call)."""
    base = _counts(quant="int8")["whole"]
    more = _counts(layers=3, quant="int8")["whole"]
    assert more.kernels - base.kernels <= 17  # 14 + the residual and bias additions the int8 kernel does not take
    assert base.ops["_weight_int8pack_mm"] > 0 and base.ops["_to_copy"] == 0


def test_fast_step_stays_within_rounding_of_the_exact_step():
    """Teacher-forced over 12 tokens (28 steps, cfg 7.5): measured max 1.1e-6 (eager) and 1.2e-6
    (the capturable step), float32, 2 threads; 2e-5 leaves room for other CPUs and thread counts."""
    bb, head = build(layers=2, heads=4, kv=2, head_dim=16, mlp=128, head_width=64, head_layers=2)
    for static in (False, True):
        d = lockstep(bb, head, 12, SamplingSettings(steps=28, cfg=7.5), static=static)
        torch.testing.assert_close(d, torch.zeros_like(d), atol=2e-5, rtol=0)
    d = lockstep(bb, head, 8, SamplingSettings(steps=5, cfg=4.0, sampler="nextstep1.1"), cfg_mult=1)
    torch.testing.assert_close(d, torch.zeros_like(d), atol=2e-5, rtol=0)
    # two images of three edit rows each: the folded guidance mixes only the rows of one image
    # (measured max 1.4e-6)
    d = lockstep(bb, head, 4, SamplingSettings(steps=28, cfg=7.5, cfg_img=2.0), cfg_mult=3, images=2)
    torch.testing.assert_close(d, torch.zeros_like(d), atol=2e-5, rtol=0)


def test_a_wrong_fused_head_breaks_the_bound(monkeypatch):
    """The same check catches a real mistake: LayerNorm without its affine weights (the bug class
    a fused rewrite invites)."""
    import torch.nn.functional as F
    from nextstep_core import flow_head
    bb, head = build(layers=2, heads=4, kv=2, head_dim=16, mlp=128, head_width=64, head_layers=2)
    with torch.no_grad():
        for blk in head.net.res_blocks:
            blk.in_ln.weight.normal_(1.0, 0.2)

    def no_affine(self, x, shift, scale1, gate):
        h = torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], None, None, 1e-6), scale1)
        return torch.addcmul(x, gate, self.mlp[2](F.silu(self.mlp[0](h))))
    monkeypatch.setattr(flow_head.ResBlock, "run_fused", no_affine)
    d = lockstep(bb, head, 4, SamplingSettings(steps=4, cfg=7.5))
    assert d.max() > 1e-3


def test_fused_weights_share_storage_stay_editable_and_survive_moves():
    lins = [nn.Linear(32, n) for n in (32, 8, 8)]
    x = torch.randn(3, 32)
    with torch.inference_mode():  # as generation runs it: the members must stay ordinary tensors
        f = fused_linear(lins)
        y = f(x)
    torch.testing.assert_close(y, torch.cat([m(x) for m in lins], -1), atol=1e-6, rtol=0)  # one GEMM vs three
    base = lins[0].weight.untyped_storage().data_ptr()
    assert all(m.weight.untyped_storage().data_ptr() == base for m in lins)  # no second copy of any weight
    with torch.no_grad():
        lins[1].weight[0, 0] += 1.0  # an in-place patch outside inference mode
    assert torch.equal(f(x)[:, 32], lins[1](x)[:, 0])
    for m in lins:  # a move gives every member its own storage again
        m.weight.data = m.weight.data.clone()
    torch.testing.assert_close(f(x), torch.cat([m(x) for m in lins], -1), atol=1e-6, rtol=0)
    assert all(m.weight.untyped_storage().data_ptr() == lins[0].weight.untyped_storage().data_ptr() for m in lins)


def test_modules_that_cannot_be_fused_are_refused():
    assert fused_linear([nn.Linear(4, 4), nn.Linear(4, 4, bias=False)]) is None
    assert fused_linear([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)]) is None


def test_gpu_benchmark_script_runs_on_cpu(capsys):
    """The device script keeps working where CI runs (toy shapes, CPU): every figure it reports is printed."""
    from bench.gpu_token_loop import main
    main(["--small", "--device", "cpu", "--dtype", "float32", "--size", "32", "--steps", "3", "--reps", "1",
          "--formats", "full,int8"])
    out = capsys.readouterr().out
    assert out.count("SDPA backend at decode shapes") == 2 and "fast (folded): " in out
    for line in ("backbone step (fast)", "flow head, 3 steps", "whole step, eager", "bytes per token", "32x32 image"):
        assert line in out
    eager = [int(row.split("|")[3]) for row in out.splitlines() if row.startswith("| whole step, eager")]
    assert len(eager) == 2 and all(k > 0 for k in eager)
