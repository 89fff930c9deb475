"""VAE layout, latent normalisation and the 2x2 token packing."""
import json
import os

import pytest
import torch

from nextstep_core.checkpoint import load_vae
from nextstep_core.errors import CheckpointError
from nextstep_core.vae import VAEConfig, patchify, unpatchify


@pytest.mark.parametrize("hw", [(8, 8), (12, 4), (2, 6)])
def test_patchify_unpatchify_are_inverse_for_any_grid(hw):
    lat = torch.randn(2, 16, 2 * hw[0], 2 * hw[1])
    tokens = patchify(lat)
    assert tokens.shape == (2, hw[0] * hw[1], 64)
    assert torch.equal(unpatchify(tokens, *hw), lat)


def test_token_layout_is_channel_major_then_row_then_column():
    lat = torch.arange(16 * 4 * 4, dtype=torch.float32).reshape(1, 16, 4, 4)
    tok = patchify(lat)
    # token 1 is the patch at token-row 0, token-col 1: latent rows 0-1, cols 2-3
    assert tok[0, 1, 0 * 4 + 1 * 2 + 0] == lat[0, 0, 1, 2]
    assert tok[0, 1, 5 * 4 + 0 * 2 + 1] == lat[0, 5, 0, 3]


def test_both_config_dialects_turn_on_channel_norm():
    assert VAEConfig.from_json({"encoder_norm": True}).channel_norm
    assert VAEConfig.from_json({"norm_fn": "layer_norm", "norm_level": "channel"}).channel_norm
    assert not VAEConfig.from_json({}).channel_norm
    plain = VAEConfig.from_json({})
    assert (plain.scaling_factor, plain.shift_factor) == (1.0, 0.0)


def test_encoded_latents_are_normalised_per_latent_pixel(tiny_edit_model):
    vae = load_vae(tiny_edit_model)  # Edit-repo dialect
    with torch.no_grad():
        lat = vae.encode(torch.rand(1, 3, 32, 48) * 2 - 1)
    assert lat.shape == (1, 16, 4, 6)
    torch.testing.assert_close(lat.mean(1), torch.zeros(1, 4, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(lat.var(1, unbiased=False), torch.ones(1, 4, 6), atol=1e-3, rtol=0)


def test_vae_loads_from_model_folder_vae_folder_file_and_safetensors(tiny_model, tmp_path):
    from nextstep_core.tiny import write_tiny
    a = load_vae(tiny_model)
    b = load_vae(os.path.join(tiny_model, "vae"))
    c = load_vae(os.path.join(tiny_model, "vae", "checkpoint.pt"))
    st = write_tiny(str(tmp_path / "st"), vae_format="safetensors")
    d = load_vae(st)
    for v in (b, c):
        assert torch.equal(v.decoder.conv_out.weight, a.decoder.conv_out.weight)
    assert d.cfg.channel_norm


def test_vae_with_a_mismatched_config_is_refused(tiny_model, tmp_path):
    import shutil
    bad = tmp_path / "vae"
    shutil.copytree(os.path.join(tiny_model, "vae"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["ch"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_vae(str(bad))
