"""The backbone loader's int8 / int4 weights choice, end to end through the text-to-image node."""
import pytest

from host_stand_in import host, models_dir, pack  # noqa: F401
from test_nodes import call, result_of, t2i_args


@pytest.mark.parametrize("weights,cls", [("int8", "Int8Linear"), ("int4", "Int4Linear")])
def test_quantized_backbone_loads_and_generates(pack, host, weights, cls):
    m = pack.NODE_CLASS_MAPPINGS
    quant = pytest.importorskip(f"{pack.__name__}.nextstep_core.weights.quant")
    (bb,) = result_of(call(m["NextStepBackboneLoader"], model_name="NextStep-1-Large", dtype="auto", device="auto",
                           weights=weights))
    assert isinstance(bb.module.layers[0].mlp.down_proj, getattr(quant, cls))
    (head,) = result_of(call(m["NextStepFlowHeadLoader"], model_name="NextStep-1-Large", dtype="auto", device="auto"))
    (vae,) = result_of(call(m["NextStepVAELoader"], vae_name="NextStep-1-Large/vae", dtype="auto", device="auto"))
    images, _ = result_of(call(m["NextStepTextToImage"], **t2i_args(pack, (bb, head, vae), width=32, height=32)))
    assert images.shape == (1, 32, 32, 3)


def test_unknown_weights_choice_is_named(pack, host):
    from comfyui_nextstep_under_test.nextstep_core.errors import SettingsError
    with pytest.raises(SettingsError, match="weights='int3'"):
        call(pack.NODE_CLASS_MAPPINGS["NextStepBackboneLoader"], model_name="NextStep-1-Large", dtype="auto",
             device="auto", weights="int3")
