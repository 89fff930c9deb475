"""The backbone loader's weights choice inside ComfyUI: every decoder matrix becomes one of core's
mixed-precision layers holding the weight in core's format (int8_tensorwise, float8_e4m3fn), or in
the pack's int4 registered as a core layout, and the text-to-image node draws with it."""
import pytest
import torch

from host_stand_in import host, models_dir, pack  # noqa: F401
from test_nodes import call, result_of, t2i_args


def load(pack, weights):
    m = pack.NODE_CLASS_MAPPINGS
    (bb,) = result_of(call(m["NextStepBackboneLoader"], model_name="NextStep-1-Large", dtype="auto", device="auto",
                           weights=weights))
    (head,) = result_of(call(m["NextStepFlowHeadLoader"], model_name="NextStep-1-Large", dtype="auto", device="auto"))
    (vae,) = result_of(call(m["NextStepVAELoader"], vae_name="NextStep-1-Large/vae", dtype="auto", device="auto"))
    return bb, head, vae


@pytest.mark.parametrize("weights,fmt,stored", [("int8", "int8_tensorwise", torch.int8),
                                                ("fp8", "float8_e4m3fn", torch.float8_e4m3fn)])
def test_8_bit_weights_are_cores_formats(pack, host, weights, fmt, stored):
    parts = load(pack, weights)
    matrices = [m for layer in parts[0].module.layers for m in layer.modules() if hasattr(m, "quant_format")]
    assert len(matrices) == 7 * len(parts[0].module.layers) == host.quantized
    assert {m.quant_format for m in matrices} == {fmt} and {m.weight.dtype for m in matrices} == {stored}
    images, _ = result_of(call(pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"],
                               **t2i_args(pack, parts, width=32, height=32)))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_int4_weights_are_the_packs_layout_in_core(pack, host):
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor import QuantizedTensor
    parts = load(pack, "int4")
    matrices = [m for layer in parts[0].module.layers for m in layer.modules() if hasattr(m, "quant_format")]
    assert len(matrices) == 7 * len(parts[0].module.layers)
    assert all(m.quant_format == "nextstep_int4" and isinstance(m.weight.data, QuantizedTensor) for m in matrices)
    images, _ = result_of(call(pack.NODE_CLASS_MAPPINGS["NextStepTextToImage"],
                               **t2i_args(pack, parts, width=32, height=32)))
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(images).all()


def test_unknown_weights_choice_is_named(pack, host):
    """ComfyUI refuses a value outside the combo; a direct call gets the engine's loader's message."""
    from comfyui_nextstep_under_test.nextstep_core.errors import SettingsError
    with pytest.raises(SettingsError, match="Unknown weight format 'int3': use one of int8, fp8, int4"):
        call(pack.NODE_CLASS_MAPPINGS["NextStepBackboneLoader"], model_name="NextStep-1-Large", dtype="auto",
             device="auto", weights="int3")
