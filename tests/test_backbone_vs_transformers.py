"""Our backbone against transformers' Qwen2Model on the same random weights."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from nextstep_core.backbone import Backbone
from nextstep_core.config import BackboneConfig

CFG = BackboneConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
                     vocab_size=128, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=True, o_bias=False)


def pair():
    torch.manual_seed(0)
    ours = Backbone(CFG)
    for p in ours.parameters():
        p.data.normal_(0, 0.2)
    qcfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=96, vocab_size=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                                    max_position_embeddings=512, attn_implementation="eager")
    ref = transformers.Qwen2Model(qcfg).eval()
    missing, unexpected = ref.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("image_")}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours.eval(), ref


@torch.no_grad()
def test_prefill_equals_qwen2():
    ours, ref = pair()
    ids = torch.randint(0, 128, (2, 11))
    want = ref(input_ids=ids).last_hidden_state
    cache = ours.new_cache(2, 16)
    got = ours.prefill(ours.embed(ids), torch.ones_like(ids), cache)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_decode_steps_equal_full_forward():
    ours, ref = pair()
    ids = torch.randint(0, 128, (3, 9))
    want = ref(input_ids=ids).last_hidden_state
    cache = ours.new_cache(3, 12)
    first = ours.prefill(ours.embed(ids[:, :5]), torch.ones(3, 5), cache)
    steps = [ours.step(ours.embed(ids[:, i:i + 1]), cache, kv_len=None if i % 2 else i + 1) for i in range(5, 9)]
    got = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padding_uses_cache_positions_like_the_official_code():
    """Pads are masked, and positions count them (position ids = cache positions, no cumsum)."""
    ours, ref = pair()
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = ref(input_ids=ids, attention_mask=mask, position_ids=torch.arange(8)[None].expand(2, -1)).last_hidden_state
    got = ours.prefill(ours.embed(ids), mask, ours.new_cache(2, 8))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], atol=2e-5, rtol=1e-5)
